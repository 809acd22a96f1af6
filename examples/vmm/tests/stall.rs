//! `ember` when its outputs stall or fail: a guest flooding COM1 while nobody reads
//! stdout, a serial file with a size limit, and a stderr that cannot be written.
//! None of them may stall a vCPU, keep SIGTERM from ending the VM, or abort `ember`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ember_guests::flood::{self, FLOOD_LINE};
use ember_guests::testing::kvm_available;
use ember_guests::GuestError;

/// How long `ember` may take to end after SIGTERM before the test calls it hung: a hang
/// detector, not a timing test (the latency is printed, and measured well below this).
const HANG: Duration = Duration::from_secs(5);
/// How long any other step may take.
const LIMIT: Duration = Duration::from_secs(60);

/// Writes the guest image `image` (one of [`ember_guests::flood`]'s) into `dir`.
fn write_guest(dir: &tempfile::TempDir, name: &str, image: Result<Vec<u8>, GuestError>) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, image.unwrap()).unwrap();
    path
}

/// Sends a page of text to COM1 `pages` times (`None`: for ever), one exit per page,
/// then exits with `code`.
fn flood_guest(dir: &tempfile::TempDir, name: &str, pages: Option<u32>, code: u8) -> PathBuf {
    write_guest(dir, name, flood::flood_com1(pages, code))
}

/// A pipe: (read end, write end), both close-on-exec (the child gets the write end
/// through `Stdio`, which dups it).
fn pipe() -> (File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 just created both descriptors; nothing else owns them.
    unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Bytes waiting in the pipe whose read end is `r`, and its capacity.
///
/// The pipe is full (a write blocks) when less than a page is free: it holds whole
/// pages, and a write that merged into a partly filled page can leave a little room.
fn pipe_fill(r: &File) -> (usize, usize) {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer given.
    let rc = unsafe { libc::ioctl(r.as_raw_fd(), libc::FIONREAD, &mut queued) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    // SAFETY: F_GETPIPE_SZ only reads the descriptor's pipe.
    let size = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_GETPIPE_SZ) };
    assert!(
        size > 0,
        "F_GETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
    (queued as usize, size as usize)
}

fn read_text(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// `ember` started with `args`, stdout the write end of a pipe the test never reads,
/// stdin a pipe already at EOF, and stderr a file.
struct Ember {
    child: Option<Child>,
    stdout: File,
    stderr: PathBuf,
}

impl Ember {
    fn start(dir: &tempfile::TempDir, args: &[&str]) -> Ember {
        let (stdout, stdout_w) = pipe();
        let (stdin_r, stdin_w) = pipe();
        drop(stdin_w);
        let stderr = dir.path().join("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(args)
            .stdin(Stdio::from(OwnedFd::from(stdin_r)))
            .stdout(Stdio::from(stdout_w))
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("cannot start ember");
        Ember {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    fn pid(&self) -> libc::pid_t {
        self.child.as_ref().expect("running").id() as libc::pid_t
    }

    fn stderr(&self) -> String {
        read_text(&self.stderr)
    }

    /// Waits until `done` holds; fails if `ember` exits first or `LIMIT` passes.
    fn wait_for(&mut self, what: &str, mut done: impl FnMut(&Ember) -> bool) {
        let start = Instant::now();
        while !done(self) {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().unwrap() {
                panic!("ember exited ({status}) before {what}: {}", self.stderr());
            }
            assert!(
                start.elapsed() < LIMIT,
                "no {what} after {LIMIT:?}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for `ember` to exit, at most `limit`; on a hang, kills it and fails.
    fn wait_exit(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let child = self.child.take().expect("running");
        wait_exit(child, limit, || self.stderr())
    }
}

/// Waits for `child` to exit, at most `limit`; returns its status and how long that
/// took. On a hang, kills it and fails, with `context()` in the message.
fn wait_exit(
    mut child: Child,
    limit: Duration,
    context: impl FnOnce() -> String,
) -> (ExitStatus, Duration) {
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send((child.wait(), Instant::now()));
    });
    match rx.recv_timeout(limit) {
        Ok((status, at)) => {
            let _ = waiter.join();
            (status.unwrap(), at - start)
        }
        Err(_) => {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = waiter.join();
            panic!(
                "ember hung: still running {limit:?} later (killed); stderr:\n{}",
                context()
            );
        }
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The kernel's wait channel of each of `pid`'s threads, by thread name.
fn thread_wchans(pid: libc::pid_t) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let p = task.path();
        let name = read_text(&p.join("comm")).trim().to_string();
        let wchan = read_text(&p.join("wchan"));
        out.push(format!("{name}:{wchan}"));
    }
    out.sort();
    out
}

#[test]
fn sigterm_ends_a_guest_flooding_a_stdout_nobody_reads() {
    if !kvm_available("sigterm_ends_a_guest_flooding_a_stdout_nobody_reads") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = flood_guest(&dir, "flood", None, 0);
    let mut latencies = Vec::new();
    for (round, (signo, status)) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGTERM, 143),
    ]
    .into_iter()
    .enumerate()
    {
        let mut ember = Ember::start(&dir, &["--kernel", kernel.to_str().unwrap()]);
        // The pipe fills (nobody reads it): from then on every write to stdout blocks.
        ember.wait_for("a full stdout pipe", |e| {
            let (queued, size) = pipe_fill(&e.stdout);
            queued + 4096 > size
        });
        // Then ember's own buffer fills (1 MiB at a byte per exit: several seconds
        // here, so only in the first round), and it says it drops output. Before the
        // fix, a vCPU blocked in write(2) instead, and no such line came.
        let start = Instant::now();
        let wait = if round == 0 {
            LIMIT
        } else {
            Duration::from_millis(200)
        };
        while !ember.stderr().contains("dropping guest output") && start.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!(
            "round {round}: threads before signal {signo}: {:?}",
            thread_wchans(ember.pid())
        );
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(ember.pid(), signo) }, 0);
        let (exit, latency) = ember.wait_exit(HANG);
        let stderr = ember.stderr();
        eprintln!("round {round}: signal {signo} -> exit in {latency:?} ({exit})");
        assert_eq!(exit.code(), Some(status), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        // The warning when dropping started, and the total at the end (what was still
        // buffered is dropped on the signal).
        if round == 0 {
            assert!(
                stderr.contains("ember: warning: serial: stdout is not keeping up"),
                "{stderr}"
            );
        }
        let total = stderr
            .lines()
            .find(|l| l.starts_with("ember: warning: console: "))
            .unwrap_or_else(|| panic!("no total of dropped bytes: {stderr}"));
        assert!(
            total.ends_with(" bytes of guest output dropped (nobody was reading stdout)"),
            "{total}"
        );
        latencies.push(latency);
    }
    latencies.sort();
    eprintln!(
        "signal-to-exit latency with a flooding guest and a stalled stdout: median {:?}, min {:?}, max {:?} ({} runs)",
        latencies[latencies.len() / 2],
        latencies[0],
        latencies[latencies.len() - 1],
        latencies.len()
    );
}

#[test]
fn a_guest_that_floods_then_exits_ends_even_if_nobody_reads() {
    if !kvm_available("a_guest_that_floods_then_exits_ends_even_if_nobody_reads") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 128 KiB: twice what the pipe holds.
    let sent = 32 * 4096;
    let kernel = flood_guest(&dir, "flood-exit", Some(32), 9);
    let mut ember = Ember::start(&dir, &["--kernel", kernel.to_str().unwrap()]);
    // Ember waits for its last output while some is written, then gives up on it.
    let (exit, took) = ember.wait_exit(LIMIT);
    let stderr = ember.stderr();
    eprintln!("ended in {took:?} ({exit})");
    assert_eq!(exit.code(), Some(9), "{stderr}");
    let (queued, size) = pipe_fill(&ember.stdout);
    assert!(
        queued + 4096 > size,
        "the pipe was left full: {queued} of {size}"
    );
    let total = stderr
        .lines()
        .find(|l| l.starts_with("ember: warning: console: "))
        .unwrap_or_else(|| panic!("no total of dropped bytes: {stderr}"));
    let dropped: u64 = total
        .trim_start_matches("ember: warning: console: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{total}"));
    // What the guest sent is in the pipe, was dropped, or was in the write that was
    // stuck when ember gave up.
    assert!(
        dropped > 0 && dropped + queued as u64 <= sent,
        "{dropped} dropped, {queued} in the pipe: {stderr}"
    );
}

#[test]
fn serial_file_output_stops_at_its_limit() {
    if !kvm_available("serial_file_output_stops_at_its_limit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 64 pages, 256 KiB, into a file capped at 40 KiB.
    let kernel = flood_guest(&dir, "flood-64", Some(64), 3);
    let log = dir.path().join("serial.log");
    let spec = format!("file={},max=40K", log.display());
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args([
            "--kernel",
            kernel.to_str().unwrap(),
            "--serial",
            &spec,
            "-v",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("cannot start ember");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let written = std::fs::read(&log).unwrap();
    assert_eq!(written.len(), 40 << 10, "{stderr}");
    let expected: Vec<u8> = FLOOD_LINE.iter().cycle().take(40 << 10).copied().collect();
    assert!(
        written == expected,
        "the file holds the guest's first 40 KiB"
    );
    // Noted once, and the rest counted.
    let noted = stderr
        .lines()
        .filter(|l| l.contains("reached its size limit of 40960 bytes"))
        .count();
    assert_eq!(noted, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "console: {} bytes of guest output past the output file's size limit discarded",
            (256 << 10) - (40 << 10)
        )),
        "{stderr}"
    );
}

#[test]
fn a_stderr_that_cannot_be_written_does_not_end_ember() {
    if !kvm_available("a_stderr_that_cannot_be_written_does_not_end_ember") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Asks for ACPI sleep state S3 (a warning each time) 1000 times, then exits with 42.
    let kernel = warning_guest(&dir, "warn", Some(1000), 42);
    // Every write to /dev/full fails (ENOSPC); `eprintln!` would panic on the first
    // warning, and the release build abort.
    for verbose in [&[][..], &["-vv"][..]] {
        let child = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(["--kernel", kernel.to_str().unwrap()])
            .args(verbose)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::options().write(true).open("/dev/full").unwrap())
            .spawn()
            .expect("cannot start ember");
        // (With `eprintln!` the vCPU thread's panic leaves ember waiting for ever.)
        let (status, _) = wait_exit(child, LIMIT, || format!("{verbose:?}"));
        assert_eq!(status.code(), Some(42), "{verbose:?}: {status}");
    }
    // The same guest with a readable stderr: the warnings are there, rate-limited.
    let out = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["--kernel", kernel.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .expect("cannot start ember");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(42), "{stderr}");
    let warnings = stderr
        .lines()
        .filter(|l| l.contains("ACPI sleep type 3"))
        .count();
    assert!(
        (1..=20).contains(&warnings),
        "{warnings} lines for 1000 writes:\n{stderr}"
    );
}

/// A guest that prints a line, then makes `ember` warn in a loop: `times` times, then
/// exits with `code`; `None`: for ever.
fn warning_guest(dir: &tempfile::TempDir, name: &str, times: Option<u32>, code: u8) -> PathBuf {
    write_guest(dir, name, flood::warn_in_a_loop(times, code))
}

/// A pipe for `ember`'s stderr that is already full: whatever `ember` writes to it
/// blocks (the test never reads it). Returns the read end and the write end.
fn full_stderr_pipe() -> (File, OwnedFd) {
    let (r, w) = pipe();
    let (_, size) = pipe_fill(&r);
    let filler = vec![b'.'; size];
    // SAFETY: `filler` is valid for reads of its length; `w` is open. The pipe is empty
    // and exactly `size` bytes long, so the write fills it without blocking.
    let n = unsafe { libc::write(w.as_raw_fd(), filler.as_ptr().cast(), filler.len()) };
    assert_eq!(n, size as isize, "{}", std::io::Error::last_os_error());
    let (queued, size) = pipe_fill(&r);
    assert!(queued + 4096 > size, "{queued} of {size}");
    (r, w)
}

/// Starts `ember` on `kernel` with stderr `stderr`, stdout a pipe the test reads
/// (returned), and stdin at EOF; waits until the guest has printed its first line.
fn start_with_stderr(kernel: &Path, stderr: OwnedFd) -> (Child, File) {
    let (stdout, stdout_w) = pipe();
    let child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["--kernel", kernel.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout_w))
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("cannot start ember");
    (child, stdout)
}

#[test]
fn sigterm_ends_a_guest_that_makes_ember_log_to_a_full_stderr() {
    if !kvm_available("sigterm_ends_a_guest_that_makes_ember_log_to_a_full_stderr") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = warning_guest(&dir, "warn-forever", None, 0);
    let mut latencies = Vec::new();
    for (round, (signo, status)) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGTERM, 143),
    ]
    .into_iter()
    .enumerate()
    {
        let (stderr, stderr_w) = full_stderr_pipe();
        let (child, stdout) = start_with_stderr(&kernel, stderr_w);
        let pid = child.id() as libc::pid_t;
        // The guest runs, and warns right after: give its vCPU time to log a line (and,
        // before the fix, to block in write(2) with it).
        let start = Instant::now();
        while pipe_fill(&stdout).0 == 0 {
            assert!(start.elapsed() < LIMIT, "the guest never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(200));
        eprintln!(
            "round {round}: threads before signal {signo}: {:?}",
            thread_wchans(pid)
        );
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, signo) }, 0);
        let (exit, latency) = wait_exit(child, HANG, || {
            format!("round {round}: stderr full; threads were blocked")
        });
        eprintln!("round {round}: signal {signo} -> exit in {latency:?} ({exit})");
        assert_eq!(exit.code(), Some(status), "round {round}");
        // Nothing more fitted in the pipe.
        let (queued, size) = pipe_fill(&stderr);
        assert!(queued + 4096 > size, "{queued} of {size}");
        latencies.push(latency);
    }
    latencies.sort();
    eprintln!(
        "signal-to-exit latency with a guest making ember log to a full stderr: median {:?}, min {:?}, max {:?} ({} runs)",
        latencies[latencies.len() / 2],
        latencies[0],
        latencies[latencies.len() - 1],
        latencies.len()
    );
}

#[test]
fn a_guest_that_makes_ember_log_to_a_full_stderr_then_exits_ends() {
    if !kvm_available("a_guest_that_makes_ember_log_to_a_full_stderr_then_exits_ends") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = warning_guest(&dir, "warn-exit", Some(1000), 7);
    let (stderr, stderr_w) = full_stderr_pipe();
    let (child, _stdout) = start_with_stderr(&kernel, stderr_w);
    // Ember gives up on its stalled log lines once none was written for a while.
    let (exit, took) = wait_exit(child, LIMIT, || "stderr full".to_string());
    eprintln!("ended in {took:?} ({exit})");
    assert_eq!(exit.code(), Some(7));
    let (queued, size) = pipe_fill(&stderr);
    assert!(queued + 4096 > size, "{queued} of {size}");
}

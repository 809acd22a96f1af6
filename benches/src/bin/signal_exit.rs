//! Signal-to-exit benchmark: how long `ember` takes to end after SIGTERM or SIGINT
//! while its guest floods COM1 or makes it log, and while nobody reads its stdout or
//! stderr, against the same signal to an idle guest whose outputs are read (the floor)
//! and to a process with no VM at all. The goal: every run ends within 100 ms.
//!
//! `cargo build --release -p ember-vmm && cargo run --release -p ember-benches --bin
//! signal-exit [-- --help]`

use std::error::Error;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_benches::process::is_executable;
use ember_benches::report::median;
use ember_guests::flood;

const USAGE: &str = "\
usage: signal-exit [--runs N] [--ember PATH]

Starts `ember` on guests that flood its outputs, sends SIGTERM and SIGINT in turn, and
times each from the signal to the process being reaped, against an idle guest with its
outputs read (the floor) and against `sleep` (no VM). Goal: every run within 100 ms.

  --runs N      runs per case (default 10; signals alternate SIGTERM, SIGINT)
  --ember PATH  the ember binary (default: target/release/ember)";

/// The goal for every run, from the issue: the VM ends within 100 ms of the signal.
const GOAL: Duration = Duration::from_millis(100);
/// A run still going this long after its signal is a hang: it is killed and reported.
const HANG: Duration = Duration::from_secs(10);
/// How long a case may take to reach its state before the signal.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);
/// How long a case runs in its state before the signal, so blocked threads are blocked.
const SETTLE: Duration = Duration::from_millis(200);

#[derive(Debug)]
struct Options {
    runs: usize,
    ember: Option<PathBuf>,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, String> {
    let mut options = Options {
        runs: 10,
        ember: None,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--runs" => {
                let v = value("--runs")?;
                options.runs = match v.parse() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(format!("--runs {v}: not a positive number")),
                };
            }
            "--ember" => options.ember = Some(PathBuf::from(value("--ember")?)),
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Some(options))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let options = match parse_args(argv.iter().skip(1).cloned()) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("signal-exit: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    ember_benches::run_with_kvm("signal-exit", || run(&options))
}

/// What a case does with `ember`'s stdout and stderr, and which guest it runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    /// `sleep 60`: no VM, what the kernel takes to deliver a signal and reap a process.
    NoVm,
    /// The idle guest (halted), stdout read: the floor.
    Idle,
    /// A guest flooding COM1, stdout read as fast as it comes.
    FloodRead,
    /// A guest flooding COM1, stdout a full pipe nobody reads: `ember`'s console
    /// writer is blocked in write(2).
    FloodStalled,
    /// A guest making `ember` warn in a loop, stderr a full pipe nobody reads.
    WarnStalled,
}

impl Case {
    const ALL: [Case; 5] = [
        Case::NoVm,
        Case::Idle,
        Case::FloodRead,
        Case::FloodStalled,
        Case::WarnStalled,
    ];

    fn label(self) -> &'static str {
        match self {
            Case::NoVm => "`sleep`, no VM (reference)",
            Case::Idle => "idle guest, outputs read (floor)",
            Case::FloodRead => "guest flooding COM1, stdout read",
            Case::FloodStalled => "guest flooding COM1, stdout never read",
            Case::WarnStalled => "guest making ember warn, stderr a full pipe",
        }
    }
}

/// The directory of guest images and stderr files, removed when dropped.
struct WorkDir {
    path: PathBuf,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A pipe: (read end, write end), both close-on-exec (`Stdio` dups the end it is
/// given).
fn pipe() -> std::io::Result<(File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just created both descriptors; nothing else owns them.
    Ok(unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Bytes queued in the pipe whose read end is `r`, and its capacity.
fn pipe_fill(r: &File) -> std::io::Result<(usize, usize)> {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer given.
    if unsafe { libc::ioctl(r.as_raw_fd(), libc::FIONREAD, &mut queued) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_GETPIPE_SZ only reads the descriptor's pipe.
    let size = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if size <= 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((queued.max(0) as usize, size as usize))
}

/// A pipe whose write end is full: a write to it blocks until someone reads, which
/// nobody does. Returns both ends; the read end must stay open.
fn full_pipe() -> std::io::Result<(File, OwnedFd)> {
    let (r, w) = pipe()?;
    let (_, size) = pipe_fill(&r)?;
    let filler = vec![b'.'; size];
    // SAFETY: `filler` is valid for reads of its length and `w` is open; the pipe is
    // empty and exactly `size` bytes long, so this write fills it without blocking.
    let n = unsafe { libc::write(w.as_raw_fd(), filler.as_ptr().cast(), filler.len()) };
    if n != size as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok((r, w))
}

/// A thread reading a pipe to its end, counting the bytes.
struct Reader {
    bytes: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl Reader {
    fn start(mut r: File) -> Reader {
        let bytes = Arc::new(AtomicU64::new(0));
        let counter = bytes.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0; 64 << 10];
            while let Ok(n @ 1..) = r.read(&mut buf) {
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        Reader { bytes, thread }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// One started process of a case, in the state the case describes.
struct Started {
    child: Child,
    stderr: PathBuf,
    /// What keeps a pipe's read end open (never read), or reads it.
    _stalled: Option<File>,
    reader: Option<Reader>,
}

/// Waits until `ready` holds, or fails if the child exits or `SETTLE_LIMIT` passes.
fn wait_until(
    child: &mut Child,
    what: &str,
    mut ready: impl FnMut() -> Result<bool, Box<dyn Error>>,
) -> Result<(), Box<dyn Error>> {
    let start = Instant::now();
    while !ready()? {
        if let Some(status) = child.try_wait()? {
            return Err(format!("the process ended ({status}) before {what}").into());
        }
        if start.elapsed() > SETTLE_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no {what} after {SETTLE_LIMIT:?}").into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn start(case: Case, ember: &Path, work: &WorkDir, run: usize) -> Result<Started, Box<dyn Error>> {
    let stderr_path = work.path.join(format!("stderr-{run}"));
    let guest = |name: &str| work.path.join(name).display().to_string();
    let mut command = match case {
        Case::NoVm => {
            let mut c = Command::new("sleep");
            c.arg("60");
            c
        }
        Case::Idle => ember_command(ember, &guest("idle.elf")),
        Case::FloodRead | Case::FloodStalled => ember_command(ember, &guest("flood.elf")),
        Case::WarnStalled => ember_command(ember, &guest("warn.elf")),
    };
    command.stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // signal(2), which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            // A bench started in the background by a shell ignores SIGINT, and so would
            // its children: give them the default dispositions back.
            for signo in [libc::SIGINT, libc::SIGTERM] {
                if libc::signal(signo, libc::SIG_DFL) == libc::SIG_ERR {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let (stdout_r, stdout_w) = pipe()?;
    command.stdout(Stdio::from(stdout_w));
    let mut stalled_stderr = None;
    match case {
        Case::WarnStalled => {
            let (r, w) = full_pipe()?;
            stalled_stderr = Some(r);
            command.stderr(Stdio::from(w));
        }
        _ => {
            command.stderr(File::create(&stderr_path)?);
        }
    }
    let mut child = command.spawn()?;
    // The parent's copies of the write ends are closed with `command`.
    drop(command);
    let started = match case {
        Case::FloodStalled => {
            // Once the pipe is full, ember's console writer is blocked in write(2) and
            // the guest's bytes pile up in ember's buffer. (Filling that 1 MiB buffer
            // too takes 20-60 s here, at one exit per byte; the stall tests cover it.)
            wait_until(&mut child, "a full stdout pipe", || {
                let (queued, size) = pipe_fill(&stdout_r)?;
                Ok(queued + 4096 > size)
            })?;
            Started {
                child,
                stderr: stderr_path,
                _stalled: Some(stdout_r),
                reader: None,
            }
        }
        _ => {
            let reader = Reader::start(stdout_r);
            // Idle and warning guests print a line first; the flood, 64 KiB or more.
            let enough = match case {
                Case::NoVm => 0,
                Case::FloodRead => 64 << 10,
                _ => 2,
            };
            wait_until(&mut child, "guest output", || Ok(reader.bytes() >= enough))?;
            Started {
                child,
                stderr: stderr_path,
                _stalled: stalled_stderr,
                reader: Some(reader),
            }
        }
    };
    std::thread::sleep(SETTLE);
    Ok(started)
}

fn ember_command(ember: &Path, kernel: &str) -> Command {
    let mut c = Command::new(ember);
    c.args(["--kernel", kernel]);
    c
}

/// Sends `signo` and times it to the reaping of the process; checks how it ended.
fn signal_and_time(
    case: Case,
    mut started: Started,
    signo: libc::c_int,
) -> Result<Duration, Box<dyn Error>> {
    let pid = started.child.id() as libc::pid_t;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    // Kills a hung process so the bench reports it instead of hanging.
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(HANG).is_err() {
            // SAFETY: kill(2) on our own child; it has not been reaped (the main
            // thread would have told us first).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return true;
        }
        false
    });
    let sent = Instant::now();
    // SAFETY: kill(2) on our own child, not yet reaped.
    let rc = unsafe { libc::kill(pid, signo) };
    let status = started.child.wait();
    let took = sent.elapsed();
    let _ = done_tx.send(());
    let hung = watchdog.join().unwrap_or(true);
    if rc != 0 {
        return Err(format!("kill: {}", std::io::Error::last_os_error()).into());
    }
    let status = status?;
    let stderr = std::fs::read_to_string(&started.stderr).unwrap_or_default();
    if hung {
        return Err(format!(
            "{}: still running {HANG:?} after signal {signo}; killed. stderr: {stderr}",
            case.label()
        )
        .into());
    }
    // ember ends with 128 + the signal, as a shell reports a process the signal
    // killed; `sleep` is killed by it.
    use std::os::unix::process::ExitStatusExt;
    let expected = match case {
        Case::NoVm => status.signal() == Some(signo),
        _ => status.code() == Some(128 + signo),
    };
    if !expected || stderr.contains("panicked") {
        return Err(format!(
            "{}: ended with {status} after signal {signo}; stderr: {stderr}",
            case.label()
        )
        .into());
    }
    if let Some(reader) = started.reader.take() {
        let _ = reader.thread.join();
    }
    Ok(took)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One case's figures, in milliseconds.
struct Row {
    case: Case,
    median: f64,
    min: f64,
    max: f64,
}

fn run(options: &Options) -> Result<(), Box<dyn Error>> {
    if cfg!(debug_assertions) {
        eprintln!("signal-exit: WARNING: a debug build; run with --release for real figures");
    }
    let ember = options
        .ember
        .clone()
        .unwrap_or_else(|| ember_benches::target_dir().join("release").join("ember"));
    if !is_executable(&ember) {
        return Err(format!(
            "`ember` not found at {} (not an executable file): build it with \
             `cargo build --release -p ember-vmm`, or pass --ember PATH",
            ember.display()
        )
        .into());
    }
    let work = WorkDir {
        path: std::env::temp_dir().join(format!("ember-signal-exit-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work.path)?;
    for (name, image) in [
        ("idle.elf", flood::idle()?),
        ("flood.elf", flood::flood_com1(None, 0)?),
        ("warn.elf", flood::warn_in_a_loop(None, 0)?),
    ] {
        std::fs::write(work.path.join(name), image)?;
    }
    eprintln!(
        "signal-exit: ember {}, {} run(s) per case",
        ember.display(),
        options.runs
    );

    // Cases interleaved run by run, so a slow phase of the host hits all of them.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); Case::ALL.len()];
    for run in 0..options.runs {
        let signo = if run % 2 == 0 {
            libc::SIGTERM
        } else {
            libc::SIGINT
        };
        for (i, case) in Case::ALL.into_iter().enumerate() {
            let started = start(case, &ember, &work, run)?;
            let took = signal_and_time(case, started, signo)?;
            samples[i].push(ms(took));
        }
    }
    let rows: Vec<Row> = Case::ALL
        .into_iter()
        .zip(&samples)
        .map(|(case, s)| Row {
            case,
            median: median(s).unwrap_or(f64::NAN),
            min: s.iter().copied().fold(f64::INFINITY, f64::min),
            max: s.iter().copied().fold(0.0, f64::max),
        })
        .collect();
    print_report(options, &rows);
    Ok(())
}

fn print_report(options: &Options, rows: &[Row]) {
    let floor = rows
        .iter()
        .find(|r| r.case == Case::Idle)
        .map_or(f64::NAN, |r| r.median);
    let goal = ms(GOAL);
    println!(
        "\n## Signal to exit (`cargo run --release -p ember-benches --bin signal-exit -- --runs {}`)\n",
        options.runs
    );
    println!("| case | median | min-max | median / floor | every run within {goal:.0} ms |");
    println!("|---|--:|--:|--:|---|");
    for r in rows {
        let verdict = match r.case {
            Case::NoVm => "(reference)",
            _ if r.max <= goal => "yes",
            _ => "NO",
        };
        println!(
            "| {} | {:.1} ms | {:.1}-{:.1} ms | {:.2} | {verdict} |",
            r.case.label(),
            r.median,
            r.min,
            r.max,
            r.median / floor
        );
    }
    println!(
        "\nFrom kill(2) to the process being reaped; SIGTERM and SIGINT alternate, {} run(s) per case.",
        options.runs
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Option<Options>, String> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        let o = args(&["--runs", "3", "--ember", "/x/ember"])
            .unwrap()
            .unwrap();
        assert_eq!(o.runs, 3);
        assert_eq!(o.ember.as_deref(), Some(Path::new("/x/ember")));
        assert!(args(&["--help"]).unwrap().is_none());
        assert!(args(&["--runs", "0"]).unwrap_err().contains("--runs 0"));
        assert!(args(&["--runs"]).unwrap_err().contains("needs a value"));
        assert!(args(&["--bogus"]).unwrap_err().contains("--bogus"));
    }

    #[test]
    fn a_full_pipe_is_full() {
        let (r, _w) = full_pipe().unwrap();
        let (queued, size) = pipe_fill(&r).unwrap();
        assert_eq!(queued, size);
    }
}

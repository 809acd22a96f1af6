//! `ember`'s stderr logger for the `log` facade (`ember: LEVEL: message`), and
//! [`write_stderr`] for its other messages.
//!
//! Lines go through a bounded buffer ([`BUFFER`], 256 KiB) drained by a thread of their
//! own, `ember-log`, that writes them to a duplicate of fd 2 (never made non-blocking:
//! the file description is shared with whoever gave `ember` its stderr). A thread that
//! logs only appends its line under a mutex the writer holds to swap buffers, never
//! across a `write(2)`; so a stderr nobody reads (a full pipe) stalls the writer alone,
//! not a vCPU logging a guest-triggered line, nor the main thread handling SIGTERM. When
//! the buffer is full a line is dropped and counted; the writer notes the count
//! (`ember: warning: log: N lines dropped ...`) after the lines it had.
//!
//! Whether a thread that logs also waits for its line to be written depends on the
//! phase ([`Mode`]):
//!
//! - while a VM runs (between [`buffer`] and the end of the [`Buffering`] it returns),
//!   never;
//! - otherwise (building the VM, reporting how it ended), until the line is written or
//!   the writer made no progress for [`STALL`]; then `ember` gives up on stderr and
//!   stops waiting. So the last lines are written before `ember` exits, and a stalled
//!   stderr delays the exit by [`STALL`] at most;
//! - after [`give_up`] (SIGINT or SIGTERM, or a stall), at most until a short grace
//!   period has passed.
//!
//! Before [`start`] (command-line errors; nothing runs yet) and on the writer thread
//! itself, a line is written directly. A line that cannot be written (stderr closed, a
//! full disk, a broken pipe) is lost silently: `eprintln!` would panic, and the release
//! build aborts on panic, so a guest that makes the VMM log could otherwise end it
//! through a full stderr.
//!
//! Nothing joins the writer thread: the process may exit while it is stuck in
//! `write(2)`.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// The log buffer's size: lines that do not fit are dropped and counted.
pub const BUFFER: usize = 256 << 10;

/// How long a thread waits for its line to be written while the writer makes no
/// progress, outside a VM run, before `ember` gives up on stderr.
pub const STALL: Duration = Duration::from_secs(2);

/// The writer thread's name.
pub const THREAD_NAME: &str = "ember-log";

/// A thread's formatting buffer is kept for the next line up to this capacity.
const SCRATCH_KEEP: usize = 4096;

/// Whether a thread that logs waits for its line to be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Until it is written, or the writer made no progress for [`STALL`] (then
    /// [`Mode::GaveUp`]).
    Wait,
    /// Never (a VM runs).
    Buffered,
    /// At most until then.
    GaveUp { until: Instant },
}

/// What the queue holds, under [`Queue::state`].
#[derive(Debug)]
struct State {
    /// Lines waiting for the writer thread.
    buf: Vec<u8>,
    /// How many lines (entries) `buf` holds.
    lines: u64,
    /// Bytes the writer took and has not finished with.
    in_flight: usize,
    /// At most this many bytes queued and in flight together.
    capacity: usize,
    /// Bytes queued in all: the offset where the last line queued ends.
    queued: u64,
    /// Bytes written, lost to a failed write, or discarded by [`Queue::give_up`]: a line
    /// ending at or before this offset is finished with.
    done: u64,
    /// Whether the writer thread waits on [`Queue::data`].
    writer_waiting: bool,
    /// Lines dropped in all.
    dropped: u64,
    /// Lines dropped since the writer last noted it.
    unnoted: u64,
    /// How many of the `dropped` lines [`Queue::end_buffering`] reported already.
    reported: u64,
    mode: Mode,
}

/// The queue between the threads that log and the writer thread.
#[derive(Debug)]
struct Queue {
    state: Mutex<State>,
    /// Signalled when lines arrive.
    data: Condvar,
    /// Signalled when the writer finished with some bytes, or the queue gave up.
    progress: Condvar,
}

impl Queue {
    fn new(capacity: usize) -> Queue {
        Queue {
            state: Mutex::new(State {
                buf: preallocated(capacity),
                lines: 0,
                in_flight: 0,
                capacity,
                queued: 0,
                done: 0,
                writer_waiting: false,
                dropped: 0,
                unnoted: 0,
                reported: 0,
                mode: Mode::Wait,
            }),
            data: Condvar::new(),
            progress: Condvar::new(),
        }
    }

    /// Locks the state, recovering it after a panic elsewhere: its fields are plain
    /// counters and a buffer, consistent between statements.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `line` (dropping and counting it if it does not fit), then waits as the
    /// mode says.
    fn log(&self, line: &[u8]) {
        let mut st = self.lock();
        let room = st.capacity.saturating_sub(st.buf.len() + st.in_flight);
        if line.len() > room {
            st.dropped += 1;
            st.unnoted += 1;
            return;
        }
        st.buf.extend_from_slice(line);
        st.lines += 1;
        st.queued += line.len() as u64;
        let end = st.queued;
        if st.writer_waiting {
            st.writer_waiting = false;
            self.data.notify_one();
        }
        self.wait_done(st, end, false);
    }

    /// Waits, as the mode says, until the bytes up to offset `end` are finished with;
    /// in [`Mode::Buffered`] too if `flush` (as long as the writer makes progress).
    fn wait_done(&self, mut st: MutexGuard<'_, State>, end: u64, flush: bool) {
        let mut seen = st.done;
        let mut progress = Instant::now();
        while st.done < end {
            let now = Instant::now();
            let until = match st.mode {
                Mode::Buffered if !flush => return,
                Mode::GaveUp { until } => until,
                Mode::Buffered | Mode::Wait => {
                    if st.done > seen {
                        seen = st.done;
                        progress = now;
                    }
                    let until = progress + STALL;
                    if now >= until {
                        if st.mode == Mode::Wait {
                            // The writer is stuck: stop waiting for it, from now on.
                            st.mode = Mode::GaveUp { until: now };
                        }
                        return;
                    }
                    until
                }
            };
            if now >= until {
                return;
            }
            st = self
                .progress
                .wait_timeout(st, until - now)
                .map(|(st, _)| st)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Bytes queued or being written.
    fn pending(&self) -> usize {
        let st = self.lock();
        st.buf.len() + st.in_flight
    }

    /// Waits up to `timeout` for every queued line to be written; returns whether the
    /// queue is empty (`false` at once after [`Queue::give_up`] with a write stuck).
    fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if st.buf.is_empty() && st.in_flight == 0 {
                return true;
            }
            let now = Instant::now();
            if matches!(st.mode, Mode::GaveUp { .. }) || now >= deadline {
                return false;
            }
            st = self
                .progress
                .wait_timeout(st, deadline - now)
                .map(|(st, _)| st)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Stops waiting on stderr beyond `grace` from now: threads that log wait at most
    /// until then, and [`Queue::end_buffering`] drops (and counts) what is still
    /// queued then. Lines queued before, such as a vCPU's last line just before a
    /// SIGTERM, still get the grace period: a working stderr takes them in
    /// microseconds, and only a stalled one is given up on.
    fn give_up(&self, grace: Duration) {
        let mut st = self.lock();
        st.mode = Mode::GaveUp {
            until: Instant::now() + grace,
        };
        self.progress.notify_all();
    }

    /// After [`Queue::give_up`]: waits until the queue is written or the grace period
    /// is over, then drops and counts whatever is still queued.
    fn drop_after_grace(&self) {
        let mut st = self.lock();
        let Mode::GaveUp { until } = st.mode else {
            return;
        };
        loop {
            let now = Instant::now();
            if (st.buf.is_empty() && st.in_flight == 0) || now >= until {
                break;
            }
            st = self
                .progress
                .wait_timeout(st, until - now)
                .map(|(st, _)| st)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        st.done += st.buf.len() as u64;
        st.dropped += st.lines;
        st.buf.clear();
        st.lines = 0;
        self.progress.notify_all();
    }

    fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
        self.progress.notify_all();
    }

    /// Leaves [`Mode::Buffered`]: threads wait for their lines again, unless the queue
    /// gave up on stderr. Returns the lines dropped since the last call, if any.
    fn end_buffering(&self) -> Option<u64> {
        self.drop_after_grace();
        let mut st = self.lock();
        if st.mode == Mode::Buffered {
            st.mode = Mode::Wait;
        }
        let new = st.dropped - st.reported;
        st.reported = st.dropped;
        (new > 0).then_some(new)
    }

    /// Waits until every line queued so far is finished with: until then, or the
    /// writer made no progress for [`STALL`], or the grace period after
    /// [`Queue::give_up`] is over.
    fn wait_queued(&self) {
        let st = self.lock();
        let end = st.queued;
        self.wait_done(st, end, true);
    }

    /// The writer thread: takes the whole queue at a time and writes it to `out` with no
    /// lock held, then notes the lines dropped meanwhile. `chunk` is its buffer,
    /// allocated before the thread starts.
    fn run_writer(&self, out: &mut dyn Write, mut chunk: Vec<u8>) {
        let mut note = Vec::with_capacity(128);
        loop {
            let dropped;
            {
                let mut st = self.lock();
                st.in_flight = 0;
                self.progress.notify_all();
                while st.buf.is_empty() && st.unnoted == 0 {
                    st.writer_waiting = true;
                    st = self.data.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                st.writer_waiting = false;
                chunk.clear();
                std::mem::swap(&mut st.buf, &mut chunk);
                st.lines = 0;
                st.in_flight = chunk.len();
                dropped = std::mem::take(&mut st.unnoted);
            }
            let mut rest = chunk.as_slice();
            while !rest.is_empty() {
                let n = match out.write(rest) {
                    Ok(0) => rest.len(),
                    Ok(n) => n.min(rest.len()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    // Lost: see the module docs.
                    Err(_) => rest.len(),
                };
                rest = rest.get(n..).unwrap_or_default();
                let mut st = self.lock();
                st.done += n as u64;
                st.in_flight = st.in_flight.saturating_sub(n);
                self.progress.notify_all();
            }
            if dropped > 0 {
                note.clear();
                let _ = writeln!(
                    note,
                    "ember: warning: log: {dropped} line{} dropped: stderr is not keeping up",
                    if dropped == 1 { "" } else { "s" }
                );
                let _ = out.write_all(&note);
            }
            let _ = out.flush();
        }
    }
}

/// An empty buffer with room for `capacity` bytes if that can be had, so that the two
/// buffers the queue swaps do not grow: no allocation when a thread logs.
fn preallocated(capacity: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    // A capacity too large to reserve just means growing on demand.
    let _ = buf.try_reserve_exact(capacity);
    buf
}

/// The queue, once [`start`] started the writer thread.
static QUEUE: OnceLock<Arc<Queue>> = OnceLock::new();

thread_local! {
    /// Set on the writer thread, which writes its own lines directly.
    static IS_WRITER: Cell<bool> = const { Cell::new(false) };
    /// The line being formatted, kept between lines.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Hands `line` to the writer thread, or writes it directly before [`start`] and on the
/// writer thread.
fn emit(line: &[u8]) {
    match QUEUE.get() {
        Some(queue) if !IS_WRITER.with(Cell::get) => queue.log(line),
        _ => {
            let _ = io::stderr().lock().write_all(line);
        }
    }
}

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        // Formatted whole into this thread's buffer, then queued in one piece, so that
        // lines from different threads do not interleave.
        let format = |buf: &mut Vec<u8>| {
            let _ = writeln!(buf, "ember: {level}: {}", record.args());
        };
        let scratch = SCRATCH.try_with(|scratch| {
            // Busy if formatting the arguments logged: then a buffer of its own.
            let Ok(mut buf) = scratch.try_borrow_mut() else {
                return false;
            };
            buf.clear();
            format(&mut buf);
            emit(&buf);
            if buf.capacity() > SCRATCH_KEEP {
                *buf = Vec::new();
            }
            true
        });
        if scratch != Ok(true) {
            let mut buf = Vec::new();
            format(&mut buf);
            emit(&buf);
        }
    }

    fn flush(&self) {
        if let Some(queue) = QUEUE.get() {
            if !IS_WRITER.with(Cell::get) {
                queue.wait_queued();
            }
        }
    }
}

/// Writes `text` to stderr as is, through the log buffer once [`start`] ran, ignoring
/// failures (see the module docs): for `ember`'s own messages that are not log lines.
pub fn write_stderr(text: &str) {
    emit(text.as_bytes());
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger: warnings by default, info with `-v`, debug with `-vv`. Lines are
/// written directly until [`start`].
pub fn init(verbosity: u8) {
    let level = match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Starts the writer thread ([`THREAD_NAME`]), once: later calls do nothing. The thread
/// runs `hook` first (where it installs its seccomp filter), with SIGINT and SIGTERM
/// blocked (they are for the main thread's signalfd); if the hook fails, so does
/// `start`, and lines are still written directly. If fd 2 cannot be duplicated (it is
/// closed), lines stay direct, and lost.
///
/// Call it before any thread installs a seccomp filter (the writer must not inherit
/// one) and before the VM is built.
pub fn start(hook: impl FnOnce() -> io::Result<()> + Send + 'static) -> io::Result<()> {
    if QUEUE.get().is_some() {
        return Ok(());
    }
    let Ok(fd) = io::stderr().as_fd().try_clone_to_owned() else {
        return Ok(());
    };
    let mut out = File::from(fd);
    let queue = Arc::new(Queue::new(BUFFER));
    let writer = Arc::clone(&queue);
    let chunk = preallocated(BUFFER);
    let (started_send, started) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
    let spawned = with_termination_signals_blocked(|| {
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                IS_WRITER.with(|w| w.set(true));
                let hooked = hook();
                let go = hooked.is_ok();
                let _ = started_send.send(hooked);
                if go {
                    writer.run_writer(&mut out, chunk);
                }
            })
    });
    // Never joined: see the module docs.
    spawned?;
    started
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the log writer thread exited at once")))?;
    let _ = QUEUE.set(queue);
    Ok(())
}

/// Runs `f` with SIGINT and SIGTERM blocked in this thread, so that a thread it spawns
/// starts with them blocked (and never takes them from the main thread's signalfd).
fn with_termination_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it, and
    // pthread_sigmask only reads `set` and writes `old`, both valid.
    let (old, blocked) = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        (old, rc == 0)
    };
    let result = f();
    if blocked {
        // SAFETY: `old` is the mask pthread_sigmask returned above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    }
    result
}

/// Makes threads that log stop waiting for their lines (a VM runs) until the returned
/// [`Buffering`] ends.
pub fn buffer() -> Buffering {
    if let Some(queue) = QUEUE.get() {
        queue.set_mode(Mode::Buffered);
    }
    Buffering(())
}

/// The VM-run phase of the logger (see [`buffer`]). Ending it (or dropping it) makes
/// threads wait for their lines again (unless [`give_up`] gave up on stderr), and
/// reports how many lines were dropped, if any.
#[must_use = "lines are buffered until it ends"]
#[derive(Debug)]
pub struct Buffering(());

impl Buffering {
    /// Ends the phase; see [`Buffering`].
    pub fn end(self) {}
}

impl Drop for Buffering {
    fn drop(&mut self) {
        let Some(queue) = QUEUE.get() else {
            return;
        };
        if let Some(dropped) = queue.end_buffering() {
            // Best effort: written if stderr takes it.
            log::warn!(
                "log: {dropped} log line{} dropped in all: stderr did not keep up, or ember \
                 stopped waiting for it",
                if dropped == 1 { "" } else { "s" }
            );
        }
        // Lines queued while the VM ran, before `ember` goes on (and exits).
        queue.wait_queued();
    }
}

/// Bytes of log lines waiting to be written.
pub fn pending() -> usize {
    QUEUE.get().map_or(0, |q| q.pending())
}

/// Waits up to `timeout` for the queued lines to be written; returns whether they all
/// were (at once before [`start`], and `false` at once after [`give_up`] while a write
/// is stuck).
pub fn flush(timeout: Duration) -> bool {
    QUEUE.get().is_none_or(|q| q.flush(timeout))
}

/// Gives up on stderr: the queued lines are dropped (and counted), and until the next
/// [`buffer`] a thread that logs waits at most `grace` from now for its line.
pub fn give_up(grace: Duration) {
    if let Some(queue) = QUEUE.get() {
        queue.give_up(grace);
    }
}

/// Waits until the lines queued so far are written, or the writer made no progress for
/// [`STALL`] (less after [`give_up`]), whatever the phase; at once on the writer thread.
/// Before something that may end the process at once (the seccomp self-test).
pub fn wait_written() {
    log::logger().flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A writer that collects what it gets, optionally after the test opens a gate.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    struct Gated {
        gate: Option<mpsc::Receiver<()>>,
        out: Shared,
    }

    impl Write for Gated {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            if let Some(gate) = &self.gate {
                // Blocks until the test sends (or hangs up: then never again).
                if gate.recv().is_err() {
                    self.gate = None;
                }
            }
            self.out.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A queue of `capacity` bytes and its writer thread writing to `out`.
    fn queue(capacity: usize, mut out: impl Write + Send + 'static) -> Arc<Queue> {
        let q = Arc::new(Queue::new(capacity));
        let writer = Arc::clone(&q);
        std::thread::spawn(move || writer.run_writer(&mut out, Vec::new()));
        q
    }

    /// A queue whose writer blocks on its first write until the gate opens: returns it
    /// once that write has started, with the first line ("first\n") in flight.
    fn stuck_queue(capacity: usize) -> (Arc<Queue>, mpsc::Sender<()>, Shared) {
        let out = Shared::default();
        let (open, gate) = mpsc::channel();
        let q = queue(
            capacity,
            Gated {
                gate: Some(gate),
                out: out.clone(),
            },
        );
        q.set_mode(Mode::Buffered);
        q.log(b"first\n");
        while q.lock().in_flight == 0 {
            std::thread::yield_now();
        }
        (q, open, out)
    }

    #[test]
    fn lines_are_written_in_order_and_waited_for() {
        let out = Shared::default();
        let q = queue(
            1024,
            Gated {
                gate: None,
                out: out.clone(),
            },
        );
        // Mode::Wait: each call returns once its line is written.
        q.log(b"one\n");
        assert_eq!(out.text(), "one\n");
        q.log(b"two\n");
        assert_eq!(out.text(), "one\ntwo\n");
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn a_stuck_writer_never_blocks_a_buffered_logger_and_drops_are_noted() {
        let (q, open, out) = stuck_queue(64);
        // 58 bytes left: five 10-byte lines fit, the rest is dropped, and no call
        // waits (the writer is stuck until the gate opens).
        for i in 0..1000 {
            q.log(format!("line {i:04}\n").as_bytes());
        }
        assert_eq!(q.pending(), 6 + 50);
        assert_eq!(q.lock().dropped, 995);
        drop(open);
        assert!(q.flush(Duration::from_secs(60)));
        // The writer notes the drops after the lines it had; only then is it idle.
        let start = Instant::now();
        while !out.text().contains("dropped") && start.elapsed() < Duration::from_secs(60) {
            std::thread::yield_now();
        }
        assert_eq!(
            out.text(),
            "first\nline 0000\nline 0001\nline 0002\nline 0003\nline 0004\n\
             ember: warning: log: 995 lines dropped: stderr is not keeping up\n"
        );
        assert_eq!(q.end_buffering(), Some(995));
        assert_eq!(q.end_buffering(), None);
    }

    #[test]
    fn giving_up_drops_the_queue_and_bounds_the_wait() {
        let (q, _open, _out) = stuck_queue(1024);
        q.log(b"queued\n");
        q.log(b"queued too\n");
        q.give_up(Duration::ZERO);
        assert!(!q.flush(Duration::from_secs(60)), "returns at once");
        // Not waited for: the grace period is over.
        q.log(b"later\n");
        assert_eq!(q.end_buffering(), Some(3));
        assert_eq!(q.lock().dropped, 3);
        assert!(matches!(q.lock().mode, Mode::GaveUp { .. }));
    }

    /// A line queued just before a signal is written if stderr takes it within the
    /// grace period (CI once lost a vCPU's last line: `give_up` used to drop the queue
    /// at once, whatever the writer was doing).
    #[test]
    fn lines_queued_before_giving_up_get_the_grace_period() {
        let (q, open, out) = stuck_queue(1024);
        q.log(b"the vCPU's last line\n");
        q.give_up(Duration::from_secs(60));
        // stderr starts taking lines again a little later.
        let opener = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = open.send(());
        });
        assert_eq!(q.end_buffering(), None);
        assert_eq!(out.text(), "first\nthe vCPU's last line\n");
        opener.join().unwrap();
    }

    #[test]
    fn a_stalled_writer_is_waited_for_at_most_the_stall_time() {
        let (q, _open, _out) = stuck_queue(1024);
        q.set_mode(Mode::Wait);
        let start = Instant::now();
        q.log(b"waits\n");
        assert!(start.elapsed() >= STALL);
        assert!(matches!(q.lock().mode, Mode::GaveUp { .. }));
        // Once given up, no more waiting for a stuck writer (not timed: the test would
        // hang for ever, not fail, if it waited without bound).
        q.log(b"does not wait\n");
    }

    #[test]
    fn failed_writes_release_waiters() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("broken"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let q = queue(1024, Broken);
        for _ in 0..10 {
            q.log(b"lost\n");
        }
        assert!(q.flush(Duration::from_secs(60)));
        assert_eq!(q.lock().done, 50);
        assert_eq!(q.lock().mode, Mode::Wait);
    }
}

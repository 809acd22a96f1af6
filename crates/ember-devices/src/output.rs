//! The serial port's background output: a bounded queue that the vCPU fills without
//! ever blocking, drained by a writer thread of its own that does the blocking writes.
//!
//! The vCPU side ([`QueueWriter`], the UART's `Write`) appends to the queue under a
//! mutex that the writer thread only holds to swap buffers and count: never across a
//! `write(2)`. So a writer stuck in `write(2)` (stdout a pipe nobody reads) stalls
//! neither the vCPU nor anyone waiting on the UART. When the queue is full the bytes
//! are dropped and counted, with a warning when dropping starts; past a size limit
//! (for files) they are discarded and counted, with one note.
//!
//! Nothing joins the writer thread: it ends by itself once the queue is closed and
//! empty, or abandoned, and a process may exit while it is still stuck in `write(2)`.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A function a background output's writer thread runs first, given the thread's name
/// ([`Serial::with_thread_hook`](crate::Serial::with_thread_hook)); an error stops the
/// thread before it writes anything.
pub type ThreadHook = Arc<dyn Fn(&str) -> io::Result<()> + Send + Sync>;

/// How long dropping the UART waits for queued output when the writer makes no
/// progress at all (the VMM decides for itself with [`OutputQueue::flush`] and
/// [`OutputQueue::abandon`] before that).
const DROP_STALL: Duration = Duration::from_secs(1);

/// Counters of what happened to the bytes the guest transmitted, shared by the UART's
/// events, the queue and its writer thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Bytes the UART handed to a direct writer successfully.
    pub(crate) accepted: AtomicU64,
    /// Bytes the writer thread wrote.
    pub(crate) written: AtomicU64,
    /// Bytes a failing output did not take.
    pub(crate) lost: AtomicU64,
    /// Bytes dropped because the queue was full.
    pub(crate) dropped: AtomicU64,
    /// Bytes discarded past the output's size limit.
    pub(crate) over_limit: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What the queue holds, under [`OutputQueue::state`].
#[derive(Debug)]
struct State {
    /// Bytes waiting for the writer thread.
    buf: Vec<u8>,
    /// Bytes the writer thread took and has not finished writing.
    in_flight: usize,
    /// At most this many bytes queued and in flight together.
    capacity: usize,
    /// At most this many bytes accepted in all (a file's size limit).
    limit: Option<u64>,
    /// Bytes accepted so far.
    accepted: u64,
    /// Whether the writer thread waits on [`OutputQueue::data`].
    writer_waiting: bool,
    /// Set when the queue overflowed; cleared when the writer has caught up.
    dropping: bool,
    /// Whether the size limit was reported.
    limit_noted: bool,
    /// No more bytes will come: the writer ends once the queue is empty.
    closed: bool,
    /// The VMM gave up on the output: drop everything, the writer ends.
    abandoned: bool,
}

/// The queue shared by the vCPU side and the writer thread.
#[derive(Debug)]
pub(crate) struct OutputQueue {
    state: Mutex<State>,
    /// Signalled when bytes arrive or the queue is closed or abandoned.
    data: Condvar,
    /// Signalled when the writer thread finished writing some bytes.
    progress: Condvar,
    counters: Arc<Counters>,
    /// What the output is, for messages: "stdout", "file /path".
    name: String,
}

impl OutputQueue {
    /// Starts a writer thread writing to `out` and returns the queue it drains. The
    /// thread runs `hook` first, if given (where a VMM installs its seccomp filter); if
    /// the hook fails, so does `start`.
    pub(crate) fn start(
        out: Box<dyn Write + Send>,
        capacity: usize,
        limit: Option<u64>,
        name: String,
        counters: Arc<Counters>,
        hook: Option<ThreadHook>,
    ) -> io::Result<Arc<OutputQueue>> {
        let queue = Arc::new(OutputQueue {
            state: Mutex::new(State {
                buf: preallocated(capacity),
                in_flight: 0,
                capacity,
                limit,
                accepted: 0,
                writer_waiting: false,
                dropping: false,
                limit_noted: false,
                closed: false,
                abandoned: false,
            }),
            data: Condvar::new(),
            progress: Condvar::new(),
            counters,
            name,
        });
        let writer = Arc::clone(&queue);
        let chunk = preallocated(capacity);
        // Never joined: see the module docs.
        let (started_send, started) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
        std::thread::Builder::new()
            .name("serial-output".into())
            .spawn(move || {
                let hooked = hook.map_or(Ok(()), |hook| hook("serial-output"));
                let go = hooked.is_ok();
                let _ = started_send.send(hooked);
                if go {
                    writer.run_writer(out, chunk);
                }
            })?;
        started
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the writer thread exited at once")))?;
        Ok(queue)
    }

    /// Locks the state, recovering it after a panic elsewhere: its fields are plain
    /// counters and a buffer, consistent between statements.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `bytes` for the writer thread; never blocks beyond the short critical
    /// section. Bytes past the size limit or that do not fit are counted and dropped.
    pub(crate) fn push(&self, bytes: &[u8]) {
        let mut started_dropping = None;
        let mut hit_limit = None;
        {
            let mut st = self.lock();
            if st.abandoned || st.closed {
                Counters::add(&self.counters.dropped, bytes.len());
                return;
            }
            let allowed = match st.limit {
                Some(limit) => {
                    let left = limit.saturating_sub(st.accepted);
                    bytes.len().min(usize::try_from(left).unwrap_or(usize::MAX))
                }
                None => bytes.len(),
            };
            if allowed < bytes.len() {
                Counters::add(&self.counters.over_limit, bytes.len() - allowed);
                if !st.limit_noted {
                    st.limit_noted = true;
                    hit_limit = st.limit;
                }
            }
            let room = st.capacity.saturating_sub(st.buf.len() + st.in_flight);
            let take = allowed.min(room);
            if take < allowed {
                Counters::add(&self.counters.dropped, allowed - take);
                if !st.dropping {
                    st.dropping = true;
                    started_dropping = Some(st.capacity);
                }
            }
            if let Some(chunk) = bytes.get(..take).filter(|c| !c.is_empty()) {
                st.buf.extend_from_slice(chunk);
                st.accepted += take as u64;
                if st.writer_waiting {
                    st.writer_waiting = false;
                    self.data.notify_one();
                }
            }
        }
        // Logged with no lock of the queue held.
        if let Some(limit) = hit_limit {
            log::warn!(
                "serial: {} reached its size limit of {limit} bytes; further guest output is discarded",
                self.name
            );
        }
        if let Some(capacity) = started_dropping {
            ember_rate_limiter::warn_limited!(
                "serial: {} is not keeping up; dropping guest output (its {capacity} byte buffer is full)",
                self.name
            );
        }
    }

    /// Bytes queued or being written.
    pub(crate) fn pending(&self) -> usize {
        let st = self.lock();
        st.buf.len() + st.in_flight
    }

    /// Waits up to `timeout` for every queued byte to be written; returns whether the
    /// queue is empty. `false` at once once the output was abandoned with bytes still
    /// in flight.
    pub(crate) fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if st.buf.is_empty() && st.in_flight == 0 {
                return true;
            }
            let now = Instant::now();
            if st.abandoned || now >= deadline {
                return false;
            }
            st = self
                .progress
                .wait_timeout(st, deadline - now)
                .map(|(st, _)| st)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Gives up on the output: queued bytes are dropped (and counted), later ones too,
    /// and the writer thread ends after the write it may be stuck in.
    pub(crate) fn abandon(&self) {
        let mut st = self.lock();
        if !st.abandoned {
            st.abandoned = true;
            Counters::add(&self.counters.dropped, st.buf.len());
            st.buf.clear();
            self.data.notify_all();
            self.progress.notify_all();
        }
    }

    /// No more output: the writer thread ends once it has written what is queued.
    fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        self.data.notify_all();
    }

    /// The writer thread: takes the whole queue at a time and writes it with no lock
    /// held.
    /// `chunk` is its buffer, allocated before the thread starts (and its seccomp
    /// filter with it).
    fn run_writer(&self, mut out: Box<dyn Write + Send>, mut chunk: Vec<u8>) {
        let mut failed = false;
        loop {
            {
                let mut st = self.lock();
                st.in_flight = 0;
                self.progress.notify_all();
                loop {
                    if st.abandoned {
                        return;
                    }
                    if !st.buf.is_empty() {
                        break;
                    }
                    // Caught up: the next overflow is a new episode.
                    st.dropping = false;
                    if st.closed {
                        return;
                    }
                    st.writer_waiting = true;
                    st = self.data.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                st.writer_waiting = false;
                chunk.clear();
                std::mem::swap(&mut st.buf, &mut chunk);
                st.in_flight = chunk.len();
            }
            let mut done = 0;
            while let Some(rest) = chunk.get(done..).filter(|r| !r.is_empty()) {
                match out.write(rest).and_then(|n| match n {
                    0 => Err(io::ErrorKind::WriteZero.into()),
                    n => Ok(n),
                }) {
                    Ok(n) => {
                        done += n;
                        Counters::add(&self.counters.written, n);
                        let mut st = self.lock();
                        st.in_flight = st.in_flight.saturating_sub(n);
                        self.progress.notify_all();
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        Counters::add(&self.counters.lost, rest.len());
                        if !failed {
                            failed = true;
                            log::warn!(
                                "serial: writing guest output to {} failed: {e}; lost bytes are counted",
                                self.name
                            );
                        }
                        break;
                    }
                }
            }
            let _ = out.flush();
        }
    }
}

/// An empty buffer with room for `capacity` bytes if that can be had, so that the
/// two buffers the queue swaps never grow: no allocation on the vCPU's path. (The
/// pages are only touched as output arrives.)
fn preallocated(capacity: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    // A capacity too large to reserve just means growing on demand.
    let _ = buf.try_reserve_exact(capacity);
    buf
}

/// The UART's output when it goes through an [`OutputQueue`]: every write succeeds at
/// once. Dropping it (with the UART) waits a little for queued output, unless the VMM
/// abandoned it, then lets the writer thread end.
pub(crate) struct QueueWriter(pub(crate) Arc<OutputQueue>);

impl Write for QueueWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.push(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The writer thread writes as soon as it can; waiting here would stall the
        // vCPU.
        Ok(())
    }
}

impl Drop for QueueWriter {
    fn drop(&mut self) {
        // Wait while the writer makes progress, so that output is not lost when a VMM
        // simply drops its devices and exits; give up once it makes none.
        let mut pending = self.0.pending();
        while pending > 0 && !self.0.flush(DROP_STALL) {
            let now = self.0.pending();
            if now >= pending {
                break;
            }
            pending = now;
        }
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::SharedBuf;
    use std::sync::mpsc;

    fn queue(
        out: impl Write + Send + 'static,
        capacity: usize,
        limit: Option<u64>,
    ) -> (Arc<OutputQueue>, Arc<Counters>) {
        let counters = Arc::new(Counters::default());
        let q = OutputQueue::start(
            Box::new(out),
            capacity,
            limit,
            "test".into(),
            counters.clone(),
            None,
        )
        .unwrap();
        (q, counters)
    }

    /// A writer that blocks on every write until the test lets it go.
    struct Gate {
        open: mpsc::Receiver<()>,
        out: SharedBuf,
    }
    impl Write for Gate {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            // Blocks until the test sends (or hangs up: then it never blocks again).
            let _ = self.open.recv();
            self.out.write(data)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_reach_the_writer_in_order() {
        let buf = SharedBuf::default();
        let (q, counters) = queue(buf.clone(), 1024, None);
        let mut w = QueueWriter(q.clone());
        for b in b"hello world" {
            w.write_all(&[*b]).unwrap();
        }
        assert!(q.flush(Duration::from_secs(30)));
        assert_eq!(buf.contents(), b"hello world");
        assert_eq!(counters.written.load(Ordering::Relaxed), 11);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn a_blocked_writer_never_blocks_the_producer() {
        let buf = SharedBuf::default();
        let (open, gate) = mpsc::channel();
        let (q, counters) = queue(
            Gate {
                open: gate,
                out: buf.clone(),
            },
            16,
            None,
        );
        let mut w = QueueWriter(q.clone());
        // The writer takes the first chunk and blocks in write; everything after it
        // fills the queue to its capacity, and the rest is dropped, all without
        // blocking this thread.
        w.write_all(b"a").unwrap();
        let start = Instant::now();
        while q.lock().in_flight == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "writer never took the byte"
            );
            std::thread::yield_now();
        }
        for _ in 0..100_000 {
            w.write_all(b"b").unwrap();
        }
        assert_eq!(q.pending(), 16);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 100_000 - 15);
        assert!(q.lock().dropping);
        assert!(!q.flush(Duration::ZERO));

        // Let the writer go: the queued bytes come out, and the episode ends.
        drop(open);
        assert!(q.flush(Duration::from_secs(30)));
        assert_eq!(buf.contents(), [b"a".as_slice(), &[b'b'; 15]].concat());
        assert!(!q.lock().dropping);
        assert_eq!(counters.written.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn abandon_drops_the_queue_and_does_not_wait() {
        let (_open, gate) = mpsc::channel::<()>();
        let (q, counters) = queue(
            Gate {
                open: gate,
                out: SharedBuf::default(),
            },
            64,
            None,
        );
        let mut w = QueueWriter(q.clone());
        w.write_all(b"x").unwrap();
        while q.lock().in_flight == 0 {
            std::thread::yield_now();
        }
        w.write_all(b"0123456789").unwrap();
        q.abandon();
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 10);
        assert!(!q.flush(Duration::from_secs(30)), "returns at once");
        w.write_all(b"later").unwrap();
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 15);
        // Dropping the writer does not wait for the stuck write either.
        drop(w);
    }

    #[test]
    fn output_past_the_limit_is_discarded() {
        let buf = SharedBuf::default();
        let (q, counters) = queue(buf.clone(), 1024, Some(5));
        let mut w = QueueWriter(q.clone());
        w.write_all(b"abc").unwrap();
        w.write_all(b"defg").unwrap();
        w.write_all(b"h").unwrap();
        assert!(q.flush(Duration::from_secs(30)));
        assert_eq!(buf.contents(), b"abcde");
        assert_eq!(counters.over_limit.load(Ordering::Relaxed), 3);
        assert!(q.lock().limit_noted);
    }

    /// Fails every write.
    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("broken"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn failed_writes_count_lost_bytes() {
        let (q, counters) = queue(Broken, 1024, None);
        let mut w = QueueWriter(q.clone());
        w.write_all(b"abc").unwrap();
        assert!(q.flush(Duration::from_secs(30)));
        w.write_all(b"de").unwrap();
        assert!(q.flush(Duration::from_secs(30)));
        assert_eq!(counters.lost.load(Ordering::Relaxed), 5);
        assert_eq!(counters.written.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn dropping_the_writer_flushes_what_is_queued() {
        let buf = SharedBuf::default();
        let (q, _counters) = queue(buf.clone(), 1 << 20, None);
        let mut w = QueueWriter(q.clone());
        for _ in 0..1000 {
            w.write_all(b"0123456789").unwrap();
        }
        drop(w);
        assert_eq!(buf.contents().len(), 10_000);
        assert!(q.lock().closed);
    }
}

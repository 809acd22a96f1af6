//! Rate-limited logging for messages a guest can trigger at will.
//!
//! A device that logs every malformed request lets a guest flood the host's log (and
//! fill its disk, or stall the VMM on a full stderr). Each call site of
//! [`warn_limited!`](crate::warn_limited), [`error_limited!`](crate::error_limited) or
//! [`info_limited!`](crate::info_limited) gets its own limit for each device: at most
//! [`MAX_PER_WINDOW`] lines per [`WINDOW`], the rest counted, and the count appended to
//! the next line that gets through: `... (N similar messages suppressed)`.
//!
//! "Each device" is the thread's current [`LogSource`]: a device enters its own
//! source on the threads it runs on ([`LogSource::enter`] on its worker thread,
//! [`LogSource::scope`] around a call on a vCPU thread), so one device a guest floods
//! with bad requests cannot use up another's lines at the same call site. Lines logged
//! outside any source share one limit per call site.
//!
//! ```
//! use ember_rate_limiter::warn_limited;
//!
//! for head in 0..1000u16 {
//!     // At most 10 of these are logged in any 5 s window.
//!     warn_limited!("virtio queue: head {head} out of range");
//! }
//! ```

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines a call site may log per window.
pub const MAX_PER_WINDOW: u64 = 10;

/// The window over which [`MAX_PER_WINDOW`] applies.
pub const WINDOW: Duration = Duration::from_secs(5);

/// Milliseconds since the first call in this process (a monotonic clock).
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A per-call-site log limiter: [`admit`](Self::admit) says whether a line may be
/// logged now, and how many were suppressed since the last one that was.
///
/// Lock-free (three atomics), so it can sit in a `static` and be shared by threads;
/// under contention at a window boundary the count may be off by a line or two.
///
/// ```
/// use ember_rate_limiter::log_limit::{LogLimiter, MAX_PER_WINDOW};
///
/// static LIMITER: LogLimiter = LogLimiter::new();
/// let admitted = (0..100).filter(|_| LIMITER.admit().is_some()).count() as u64;
/// assert_eq!(admitted, MAX_PER_WINDOW); // (unless the 5 s window ended meanwhile)
/// ```
#[derive(Debug)]
pub struct LogLimiter {
    max_per_window: u64,
    window_ms: u64,
    /// Start of the current window, in [`now_ms`] milliseconds.
    window_start: AtomicU64,
    /// Lines asked for in the current window.
    count: AtomicU64,
    /// Lines refused since the last admitted one.
    suppressed: AtomicU64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiter {
    /// A limiter of [`MAX_PER_WINDOW`] lines per [`WINDOW`].
    pub const fn new() -> Self {
        Self::with_limits(MAX_PER_WINDOW, WINDOW)
    }

    /// A limiter of `max_per_window` lines per `window`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use ember_rate_limiter::log_limit::LogLimiter;
    ///
    /// let limiter = LogLimiter::with_limits(1, Duration::from_secs(3600));
    /// assert_eq!(limiter.admit(), Some(0));
    /// assert_eq!(limiter.admit(), None);
    /// ```
    pub const fn with_limits(max_per_window: u64, window: Duration) -> Self {
        let window_ms = window.as_millis();
        LogLimiter {
            max_per_window,
            window_ms: if window_ms > u64::MAX as u128 {
                u64::MAX
            } else {
                window_ms as u64
            },
            window_start: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a line may be logged now, `n` being the lines suppressed since the
    /// last admitted one (to report with it); `None` if this line is to be suppressed
    /// (it is counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(now_ms())
    }

    fn admit_at(&self, now_ms: u64) -> Option<u64> {
        let start = self.window_start.load(Ordering::Acquire);
        if now_ms.saturating_sub(start) >= self.window_ms
            && self
                .window_start
                .compare_exchange(start, now_ms, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.count.store(0, Ordering::Release);
        }
        let n = self.count.fetch_add(1, Ordering::AcqRel);
        if n < self.max_per_window {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }

    /// Lines suppressed since the last admitted one.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Acquire)
    }
}

/// Sources a [`LogLimiterSet`] keeps apart; lines from any further source share its
/// overflow limit.
pub const SOURCES_PER_SITE: usize = 16;

/// Who a log line is about: one device, for [`LogLimiterSet`] to give each its own
/// limit at a call site.
///
/// ```
/// use ember_rate_limiter::log_limit::LogSource;
///
/// let disk = LogSource::new();
/// assert_ne!(disk, LogSource::new());
/// assert_eq!(LogSource::current(), LogSource::SHARED);
/// {
///     let _in_disk = disk.scope();
///     assert_eq!(LogSource::current(), disk);
/// }
/// assert_eq!(LogSource::current(), LogSource::SHARED);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LogSource(u64);

thread_local! {
    static CURRENT_SOURCE: Cell<u64> = const { Cell::new(0) };
}

impl LogSource {
    /// Lines about no device in particular: one limit per call site.
    pub const SHARED: LogSource = LogSource(0);

    /// A source distinct from every other in this process.
    #[allow(clippy::new_without_default)]
    pub fn new() -> LogSource {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        LogSource(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The calling thread's source ([`SHARED`](Self::SHARED) unless one was entered).
    pub fn current() -> LogSource {
        LogSource(CURRENT_SOURCE.with(Cell::get))
    }

    /// Makes this the calling thread's source for good: for a thread that serves one
    /// device, at its start.
    ///
    /// ```
    /// use ember_rate_limiter::log_limit::LogSource;
    ///
    /// let rng = LogSource::new();
    /// std::thread::spawn(move || {
    ///     rng.enter();
    ///     assert_eq!(LogSource::current(), rng);
    /// })
    /// .join()
    /// .unwrap();
    /// ```
    pub fn enter(self) {
        CURRENT_SOURCE.with(|c| c.set(self.0));
    }

    /// Makes this the calling thread's source until the guard is dropped, which
    /// restores the one before: for a call into a device on a thread that serves many.
    pub fn scope(self) -> LogSourceScope {
        let previous = CURRENT_SOURCE.with(|c| c.replace(self.0));
        LogSourceScope { previous }
    }
}

/// Restores the thread's previous [`LogSource`] when dropped (see [`LogSource::scope`]).
#[derive(Debug)]
#[must_use = "the source is left again when the scope is dropped"]
pub struct LogSourceScope {
    previous: u64,
}

impl Drop for LogSourceScope {
    fn drop(&mut self) {
        CURRENT_SOURCE.with(|c| c.set(self.previous));
    }
}

/// One call site's limiters: a [`LogLimiter`] for each of up to [`SOURCES_PER_SITE`]
/// sources, claimed by the first line from each, and one shared by
/// [`LogSource::SHARED`] and any source beyond those. Lock-free and allocation-free,
/// for a `static`.
///
/// ```
/// use ember_rate_limiter::log_limit::{LogLimiterSet, LogSource, MAX_PER_WINDOW};
///
/// static SITE: LogLimiterSet = LogLimiterSet::new();
/// let (a, b) = (LogSource::new(), LogSource::new());
/// let from_a = (0..100).filter(|_| SITE.admit(a).is_some()).count() as u64;
/// // `a` used up its lines; `b` still has all of its own.
/// let from_b = (0..100).filter(|_| SITE.admit(b).is_some()).count() as u64;
/// assert_eq!((from_a, from_b), (MAX_PER_WINDOW, MAX_PER_WINDOW)); // (within one 5 s window)
/// ```
#[derive(Debug)]
pub struct LogLimiterSet {
    /// Which source each limiter belongs to (0: not claimed yet).
    sources: [AtomicU64; SOURCES_PER_SITE],
    limiters: [LogLimiter; SOURCES_PER_SITE],
    shared: LogLimiter,
}

impl Default for LogLimiterSet {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiterSet {
    /// Limiters of [`MAX_PER_WINDOW`] lines per [`WINDOW`] each.
    pub const fn new() -> Self {
        LogLimiterSet {
            sources: [const { AtomicU64::new(0) }; SOURCES_PER_SITE],
            limiters: [const { LogLimiter::new() }; SOURCES_PER_SITE],
            shared: LogLimiter::new(),
        }
    }

    /// [`LogLimiter::admit`] on `source`'s limiter.
    pub fn admit(&self, source: LogSource) -> Option<u64> {
        self.limiter(source).admit()
    }

    fn limiter(&self, source: LogSource) -> &LogLimiter {
        if source == LogSource::SHARED {
            return &self.shared;
        }
        for (owner, limiter) in self.sources.iter().zip(&self.limiters) {
            let claimed = match owner.load(Ordering::Acquire) {
                0 => match owner.compare_exchange(0, source.0, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => source.0,
                    Err(other) => other,
                },
                other => other,
            };
            if claimed == source.0 {
                return limiter;
            }
        }
        &self.shared
    }
}

/// Logs at `level` through [`log`](crate::log), at most
/// [`MAX_PER_WINDOW`](crate::log_limit::MAX_PER_WINDOW) lines per
/// [`WINDOW`](crate::log_limit::WINDOW) from this call site; the next line that gets
/// through after some were suppressed ends with `(N similar messages suppressed)`.
/// Each [`LogSource`] has its own limit here: the thread's
/// [`current`](crate::log_limit::LogSource::current) one is charged.
/// Arguments are `format!`'s. Nothing is counted while `level` is disabled.
///
/// ```
/// ember_rate_limiter::log_limited!(ember_rate_limiter::log::Level::Debug, "chain {} bad", 7);
/// ```
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        let level: $crate::log::Level = $level;
        if $crate::log::log_enabled!(level) {
            static LIMITERS: $crate::log_limit::LogLimiterSet =
                $crate::log_limit::LogLimiterSet::new();
            if let ::core::option::Option::Some(suppressed) =
                LIMITERS.admit($crate::log_limit::LogSource::current())
            {
                if suppressed > 0 {
                    $crate::log::log!(
                        level,
                        "{} ({} similar messages suppressed)",
                        ::core::format_args!($($arg)+),
                        suppressed
                    );
                } else {
                    $crate::log::log!(level, $($arg)+);
                }
            }
        }
    }};
}

/// [`log::warn!`](crate::log::warn), rate-limited per call site and device (see
/// [`log_limited!`](crate::log_limited)).
///
/// ```
/// let index = 300;
/// ember_rate_limiter::warn_limited!("virtio-net: head index {index} past the queue");
/// ```
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!($crate::log::Level::Warn, $($arg)+)
    };
}

/// [`log::error!`](crate::log::error), rate-limited per call site and device (see
/// [`log_limited!`](crate::log_limited)).
///
/// ```
/// ember_rate_limiter::error_limited!("virtio-rng: getrandom failed: {}", "EIO");
/// ```
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!($crate::log::Level::Error, $($arg)+)
    };
}

/// [`log::info!`](crate::log::info), rate-limited per call site and device (see
/// [`log_limited!`](crate::log_limited)).
///
/// ```
/// ember_rate_limiter::info_limited!("virtio-net: tap has no carrier");
/// ```
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => {
        $crate::log_limited!($crate::log::Level::Info, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn admits_max_per_window_then_counts() {
        let l = LogLimiter::with_limits(3, Duration::from_millis(1000));
        assert_eq!(l.admit_at(0), Some(0));
        assert_eq!(l.admit_at(1), Some(0));
        assert_eq!(l.admit_at(2), Some(0));
        for t in 3..10 {
            assert_eq!(l.admit_at(t), None);
        }
        assert_eq!(l.suppressed(), 7);
        assert_eq!(l.admit_at(999), None);
        // A new window: admitted again, with the count of what was suppressed.
        assert_eq!(l.admit_at(1000), Some(8));
        assert_eq!(l.suppressed(), 0);
        assert_eq!(l.admit_at(1001), Some(0));
        assert_eq!(l.admit_at(1002), Some(0));
        assert_eq!(l.admit_at(1003), None);
        assert_eq!(l.admit_at(5000), Some(1));
    }

    #[test]
    fn defaults_are_ten_per_five_seconds() {
        let l = LogLimiter::new();
        let admitted = (0..1000).filter(|i| l.admit_at(i / 100).is_some()).count();
        assert_eq!(admitted, 10);
        assert_eq!(l.suppressed(), 990);
        assert_eq!(l.admit_at(4999), None);
        assert_eq!(l.admit_at(5000), Some(991));
    }

    #[test]
    fn each_source_has_its_own_limit_up_to_the_slots() {
        let set = LogLimiterSet::new();
        let admitted = |source: LogSource| (0..50).filter(|_| set.admit(source).is_some()).count();
        let sources: Vec<LogSource> = (0..SOURCES_PER_SITE).map(|_| LogSource::new()).collect();
        for &source in &sources {
            assert_eq!(admitted(source), MAX_PER_WINDOW as usize);
        }
        // Lines from no source, and from sources past the slots, share one limit.
        assert_eq!(admitted(LogSource::SHARED), MAX_PER_WINDOW as usize);
        assert_eq!(admitted(LogSource::new()), 0);
        // A source that has its slot keeps it.
        assert_eq!(admitted(sources[3]), 0);
        assert_eq!(set.limiters[3].suppressed(), 90);
    }

    #[test]
    fn sources_are_per_thread_and_scopes_nest() {
        let (a, b) = (LogSource::new(), LogSource::new());
        assert_eq!(LogSource::current(), LogSource::SHARED);
        {
            let _a = a.scope();
            {
                let _b = b.scope();
                assert_eq!(LogSource::current(), b);
                std::thread::spawn(|| assert_eq!(LogSource::current(), LogSource::SHARED))
                    .join()
                    .unwrap();
            }
            assert_eq!(LogSource::current(), a);
        }
        assert_eq!(LogSource::current(), LogSource::SHARED);
    }

    /// A logger that records lines, to check what the macros emit.
    struct Recorder(Mutex<Vec<String>>);

    impl log::Log for Recorder {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            if let Ok(mut lines) = self.0.lock() {
                lines.push(format!("{} {}", record.level(), record.args()));
            }
        }
        fn flush(&self) {}
    }

    static RECORDER: Recorder = Recorder(Mutex::new(Vec::new()));

    #[test]
    fn macros_limit_each_call_site() {
        // The only test that installs a logger.
        log::set_logger(&RECORDER).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
        for i in 0..100 {
            crate::warn_limited!("bad head {i}");
            crate::error_limited!("other site {}", i * 2);
        }
        let lines = RECORDER.0.lock().unwrap().clone();
        let warns: Vec<_> = lines.iter().filter(|l| l.starts_with("WARN")).collect();
        let errors: Vec<_> = lines.iter().filter(|l| l.starts_with("ERROR")).collect();
        // Each call site has its own budget of 10 (unless a 5 s window ended meanwhile,
        // which only allows more lines and a summary).
        assert!(warns.len() >= 10 && errors.len() >= 10, "{lines:?}");
        assert_eq!(warns[0], "WARN bad head 0");
        assert_eq!(warns[9], "WARN bad head 9");
        assert_eq!(errors[9], "ERROR other site 18");
        assert!(warns.len() < 100, "{lines:?}");
        // A suppressed count is reported with the next admitted line.
        for _ in 0..3 {
            crate::info_limited!("site three");
        }
        let lines = RECORDER.0.lock().unwrap().clone();
        assert_eq!(lines.iter().filter(|l| l.starts_with("INFO")).count(), 3);
        // The same call site, two devices: each gets its own lines.
        let (a, b) = (LogSource::new(), LogSource::new());
        for source in [a, b, a, b] {
            let _in = source.scope();
            for _ in 0..20 {
                crate::info_limited!("device {source:?}");
            }
        }
        let lines = RECORDER.0.lock().unwrap().clone();
        for source in [a, b] {
            let n = lines
                .iter()
                .filter(|l| l.starts_with(&format!("INFO device {source:?}")))
                .count();
            assert!((10..40).contains(&n), "{n}: {lines:?}");
        }
    }
}

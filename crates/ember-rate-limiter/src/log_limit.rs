//! Rate-limited logging for messages a guest can trigger at will.
//!
//! A device that logs every malformed request lets a guest flood the host's log (and
//! fill its disk, or stall the VMM on a full stderr). Each call site of
//! [`warn_limited!`](crate::warn_limited), [`error_limited!`](crate::error_limited) or
//! [`info_limited!`](crate::info_limited) gets its own [`LogLimiter`]: at most
//! [`MAX_PER_WINDOW`] lines per [`WINDOW`], the rest counted, and the count appended to
//! the next line that gets through: `... (N similar messages suppressed)`.
//!
//! ```
//! use ember_rate_limiter::warn_limited;
//!
//! for head in 0..1000u16 {
//!     // At most 10 of these are logged in any 5 s window.
//!     warn_limited!("virtio queue: head {head} out of range");
//! }
//! ```

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

/// Logs at `level` through [`log`](crate::log), at most
/// [`MAX_PER_WINDOW`](crate::log_limit::MAX_PER_WINDOW) lines per
/// [`WINDOW`](crate::log_limit::WINDOW) from this call site; the next line that gets
/// through after some were suppressed ends with `(N similar messages suppressed)`.
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
            static LIMITER: $crate::log_limit::LogLimiter = $crate::log_limit::LogLimiter::new();
            if let ::core::option::Option::Some(suppressed) = LIMITER.admit() {
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

/// [`log::warn!`](crate::log::warn), rate-limited per call site (see
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

/// [`log::error!`](crate::log::error), rate-limited per call site (see
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

/// [`log::info!`](crate::log::info), rate-limited per call site (see
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
    }
}

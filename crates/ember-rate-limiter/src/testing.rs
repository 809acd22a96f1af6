//! For tests that check that a guest cannot flood the log: a logger that records every
//! line, and the most lines rate-limited call sites may log in a given time. Behind the
//! `test-utils` feature.
//!
//! ```
//! use std::time::Instant;
//! use ember_rate_limiter::testing::{max_lines, LogRecorder};
//!
//! let log = LogRecorder::install();
//! log.take();
//! let started = Instant::now();
//! for head in 0..1000 {
//!     ember_rate_limiter::warn_limited!("head {head} past the queue");
//! }
//! let lines = log.take();
//! assert!(lines.iter().any(|l| l.contains("head 0 past the queue")));
//! assert!(lines.len() <= max_lines(1, started));
//! ```

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use crate::log_limit::{MAX_PER_WINDOW, WINDOW};

/// Records every line logged in the process, at every level, as
/// `"LEVEL target: message"`.
#[derive(Debug, Default)]
pub struct LogRecorder {
    lines: Mutex<Vec<String>>,
}

static RECORDER: OnceLock<LogRecorder> = OnceLock::new();

impl LogRecorder {
    /// The process's recorder, installed as its logger (at every level) on the first
    /// call. A test binary that uses it must not install another logger.
    ///
    /// # Panics
    ///
    /// If another logger was installed first.
    pub fn install() -> &'static LogRecorder {
        let mut installed_now = false;
        let recorder = RECORDER.get_or_init(|| {
            installed_now = true;
            LogRecorder::default()
        });
        if installed_now {
            if let Err(e) = log::set_logger(recorder) {
                panic!("LogRecorder::install: another logger is installed: {e}");
            }
            log::set_max_level(log::LevelFilter::Trace);
        }
        recorder
    }

    /// The lines recorded since the last call, oldest first.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.lines.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// How many of the lines recorded since the last [`take`](Self::take) contain
    /// `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl log::Log for LogRecorder {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}: {}", record.level(), record.target(), record.args());
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    fn flush(&self) {}
}

/// The most lines `sites` rate-limited call sites (for one log source each) may log
/// from `started` until now: a window's worth each, plus one more for every window
/// that began meanwhile (and one for a window already under way). A slow machine only
/// raises the bound, so a test using it cannot fail for being slow.
pub fn max_lines(sites: usize, started: Instant) -> usize {
    let windows = started.elapsed().as_millis() / WINDOW.as_millis().max(1) + 2;
    let windows = usize::try_from(windows).unwrap_or(usize::MAX);
    sites
        .saturating_mul(MAX_PER_WINDOW as usize)
        .saturating_mul(windows)
}

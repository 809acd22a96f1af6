//! A minimal stderr logger for the `log` facade: `ember: LEVEL: message`.
//!
//! A line that cannot be written (stderr closed, a full disk, a broken pipe) is lost
//! silently: `eprintln!` would panic, and the release build aborts on panic, so a
//! guest that makes the VMM log could otherwise end it through a full stderr.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = match record.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            // One write(2) of the whole line, so that lines from different threads
            // (or processes sharing the pipe) do not interleave.
            write_stderr(&format!("ember: {level}: {}\n", record.args()));
        }
    }

    fn flush(&self) {
        let _ = std::io::stderr().lock().flush();
    }
}

/// Writes `text` to stderr as is, ignoring failures (see the module docs): for
/// `ember`'s own messages that are not log lines.
pub fn write_stderr(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger: warnings by default, info with `-v`, debug with `-vv`.
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

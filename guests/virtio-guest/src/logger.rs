//! A `log` logger on the serial port, so virtio-drivers' own messages show up. The level
//! comes from `ember.log=<off|error|warn|info|debug|trace>` (default `warn`).

use log::{LevelFilter, Log, Metadata, Record};

struct SerialLogger;

impl Log for SerialLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            crate::println!(
                "virtio-guest: [{} {}] {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: SerialLogger = SerialLogger;

/// Installs the logger at `level` (a `LevelFilter` name; unknown names mean `warn`).
pub fn init(level: Option<&str>) {
    let filter = level
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Warn);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(filter);
    }
}

//! Helpers shared by the criterion benches: a thread-CPU-time clock (so a busy host
//! does not blur the figures) and reading this run's medians back for the summaries.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::Criterion;

/// Thread CPU time (`CLOCK_THREAD_CPUTIME_ID`), as a criterion measurement.
pub struct CpuTime;

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux has.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Measurement for CpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        thread_cpu_time()
    }
    fn end(&self, start: Duration) -> Duration {
        thread_cpu_time().saturating_sub(start)
    }
    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }
    fn zero(&self) -> Duration {
        Duration::ZERO
    }
    fn to_f64(&self, value: &Duration) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        WallTime.formatter()
    }
}

/// Where criterion writes its results: `$CRITERION_HOME`, else
/// `$CARGO_TARGET_DIR/criterion`, else the workspace's `target/criterion`. Set
/// explicitly, so that the summary reads the same place.
pub fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return home.into();
    }
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => Path::new(&dir).join("criterion"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion"),
    }
}

/// Runs a bench file's groups with the clock `EMBER_BENCH_CLOCK` selects (`cpu`: thread
/// CPU time; otherwise criterion's wall clock), no plots, results in [`criterion_dir`],
/// command-line flags applied. `cpu` and `wall` are the same generic function of the
/// file, instantiated for each measurement. Returns the clock's name for the summary.
pub fn run_groups(
    cpu: fn(&mut Criterion<CpuTime>),
    wall: fn(&mut Criterion<WallTime>),
) -> &'static str {
    fn run<M: Measurement + 'static>(m: M, groups: fn(&mut Criterion<M>)) {
        let mut c = Criterion::default()
            .with_measurement(m)
            .without_plots()
            .output_directory(&criterion_dir())
            .configure_from_args();
        groups(&mut c);
        c.final_summary();
    }
    if std::env::var("EMBER_BENCH_CLOCK").is_ok_and(|clock| clock == "cpu") {
        run(CpuTime, cpu);
        "thread CPU time"
    } else {
        run(WallTime, wall);
        "wall"
    }
}

/// The median, in ns, of benchmark `group/id` if this run (started at `since`)
/// measured it.
pub fn median_ns(group: &str, id: &str, since: SystemTime) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(id)
        .join("new/estimates.json");
    let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
    if modified < since {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
}

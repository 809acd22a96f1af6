//! Per-vCPU counters of exit reasons and, opt-in, histograms of the time the VMM spends
//! on each exit.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Why `KVM_RUN` returned, as counted by [`ExitStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum ExitKind {
    /// `in` from an I/O port.
    IoIn,
    /// `out` to an I/O port.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// `hlt` (only without the in-kernel irqchip).
    Hlt,
    /// Triple fault.
    Shutdown,
    /// PSCI/ACPI-style system event.
    SystemEvent,
    /// `KVM_RUN` interrupted by a signal (`EINTR`), e.g. a stop request.
    Interrupted,
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError,
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry,
    /// An exit the run loop left to its caller or exit handler
    /// ([`UnhandledExit`](crate::UnhandledExit)).
    Other,
    /// `int3` completed by the [instruction fallback](crate::fallback).
    FallbackInt3,
    /// `fwait` completed by the [instruction fallback](crate::fallback).
    FallbackFwait,
    /// A guest `rdmsr`/`wrmsr` the run loop handled (`KVM_EXIT_X86_RDMSR`/`WRMSR`: the
    /// [syscall trap](crate::syscall_trap)'s MSR_LSTAR).
    Msr,
    /// A `syscall` from user mode completed by the [syscall trap](crate::syscall_trap).
    SyscallTrap,
}

impl ExitKind {
    /// Every kind, in counter order.
    pub const ALL: [ExitKind; 15] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Shutdown,
        ExitKind::SystemEvent,
        ExitKind::Interrupted,
        ExitKind::InternalError,
        ExitKind::FailEntry,
        ExitKind::Other,
        ExitKind::FallbackInt3,
        ExitKind::FallbackFwait,
        ExitKind::Msr,
        ExitKind::SyscallTrap,
    ];

    /// A short lower-case name, e.g. `io-out`.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io-in",
            ExitKind::IoOut => "io-out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::SystemEvent => "system-event",
            ExitKind::Interrupted => "interrupted",
            ExitKind::InternalError => "internal-error",
            ExitKind::FailEntry => "fail-entry",
            ExitKind::Other => "other",
            ExitKind::FallbackInt3 => "fallback-int3",
            ExitKind::FallbackFwait => "fallback-fwait",
            ExitKind::Msr => "msr",
            ExitKind::SyscallTrap => "syscall-trap",
        }
    }
}

/// Number of buckets in a [`LatencyHistogram`].
pub const LATENCY_BUCKETS: usize = 16;

/// The lowest bucket's upper bound: bucket 0 holds latencies below 64 ns.
const FIRST_BOUND_NS: u64 = 64;

/// The bucket of [`LatencyHistogram`] a latency of `ns` nanoseconds falls into: bucket 0
/// holds `[0, 64)` ns, bucket `i` (1 to 14) holds `[64 << (i - 1), 64 << i)` ns, and the
/// last bucket holds everything from `64 << 14` ns (about 1.05 ms) up.
///
/// ```
/// use ember_vcpu::latency_bucket;
/// assert_eq!(latency_bucket(63), 0);
/// assert_eq!(latency_bucket(64), 1);
/// assert_eq!(latency_bucket(1_000), 4); // [512, 1024)
/// assert_eq!(latency_bucket(u64::MAX), 15);
/// ```
#[inline]
pub fn latency_bucket(ns: u64) -> usize {
    // Significant bits of max(ns, 63): 6 below 64 ns, one more per doubling.
    let bits = (u64::BITS - (ns | (FIRST_BOUND_NS - 1)).leading_zeros()) as usize;
    (bits - 6).min(LATENCY_BUCKETS - 1)
}

/// The exclusive upper bound of bucket `bucket` in nanoseconds, or `None` for the last
/// (unbounded) bucket and anything past it.
///
/// ```
/// assert_eq!(ember_vcpu::latency_bucket_bound_ns(0), Some(64));
/// assert_eq!(ember_vcpu::latency_bucket_bound_ns(14), Some(1 << 20));
/// assert_eq!(ember_vcpu::latency_bucket_bound_ns(15), None);
/// ```
pub fn latency_bucket_bound_ns(bucket: usize) -> Option<u64> {
    (bucket < LATENCY_BUCKETS - 1).then(|| FIRST_BOUND_NS << bucket)
}

/// A short label for a bucket's range: `<64ns`, `<1.0us`, ..., `>=1.05ms`.
///
/// ```
/// assert_eq!(ember_vcpu::latency_bucket_label(0), "<64ns");
/// assert_eq!(ember_vcpu::latency_bucket_label(4), "<1.0us");
/// assert_eq!(ember_vcpu::latency_bucket_label(15), ">=1.05ms");
/// ```
pub fn latency_bucket_label(bucket: usize) -> String {
    match latency_bucket_bound_ns(bucket) {
        Some(bound) => format!("<{}", format_ns(bound)),
        None => format!(">={}", format_ns(FIRST_BOUND_NS << (LATENCY_BUCKETS - 2))),
    }
}

/// Formats nanoseconds with a unit and two or three significant digits: `850ns`,
/// `1.0us`, `4.1us`, `16us`, `1.05ms`, `2.5s`.
///
/// ```
/// assert_eq!(ember_vcpu::format_ns(850), "850ns");
/// assert_eq!(ember_vcpu::format_ns(4096), "4.1us");
/// assert_eq!(ember_vcpu::format_ns(16_384), "16us");
/// assert_eq!(ember_vcpu::format_ns(1_048_576), "1.05ms");
/// ```
pub fn format_ns(ns: u64) -> String {
    let scaled = |value: f64, unit: &str| {
        if value < 10.0 {
            let digits = if unit == "ms" || unit == "s" { 2 } else { 1 };
            format!("{value:.digits$}{unit}")
        } else {
            format!("{value:.0}{unit}")
        }
    };
    match ns {
        0..=999 => format!("{ns}ns"),
        1_000..=999_999 => scaled(ns as f64 / 1e3, "us"),
        1_000_000..=999_999_999 => scaled(ns as f64 / 1e6, "ms"),
        _ => scaled(ns as f64 / 1e9, "s"),
    }
}

/// A latency histogram with log2 buckets ([`latency_bucket`]), plus the sum and the
/// maximum of what was recorded. A plain value: a snapshot of one vCPU's timings, or
/// the merge of several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencyHistogram {
    /// Count per bucket.
    pub buckets: [u64; LATENCY_BUCKETS],
    /// Sum of every latency recorded, in nanoseconds.
    pub total_ns: u64,
    /// The largest latency recorded, in nanoseconds.
    pub max_ns: u64,
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn record(&mut self, ns: u64) {
        self.buckets[latency_bucket(ns)] += 1;
        self.total_ns = self.total_ns.saturating_add(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds `other`'s counts to this one (e.g. to sum several vCPUs).
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
        self.total_ns = self.total_ns.saturating_add(other.total_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The mean latency in nanoseconds, or `None` if nothing was recorded.
    pub fn mean_ns(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.total_ns as f64 / n as f64)
    }

    /// The bucket holding the `q`-quantile (`q` in `[0, 1]`, e.g. 0.99), or `None` if
    /// nothing was recorded.
    pub fn quantile_bucket(&self, q: f64) -> Option<usize> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        // The rank of the quantile, 1-based: at least the first, at most the last.
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        self.buckets.iter().position(|&c| {
            seen += c;
            seen >= rank
        })
    }
}

/// [`LatencyHistogram`]'s counters, written by one thread and readable by any.
#[derive(Debug, Default)]
struct AtomicHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    total_ns: AtomicU64,
    max_ns: AtomicU64,
}

/// Adds one to a counter that only the calling thread writes: a plain load and store,
/// no locked read-modify-write.
#[inline]
fn bump(counter: &AtomicU64, by: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

impl AtomicHistogram {
    #[inline]
    fn record(&self, ns: u64) {
        bump(&self.buckets[latency_bucket(ns)], 1);
        bump(&self.total_ns, ns);
        if ns > self.max_ns.load(Ordering::Relaxed) {
            self.max_ns.store(ns, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> LatencyHistogram {
        LatencyHistogram {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            total_ns: self.total_ns.load(Ordering::Relaxed),
            max_ns: self.max_ns.load(Ordering::Relaxed),
        }
    }
}

/// Exit counters of one vCPU and, when exit timing is on
/// ([`Vcpu::enable_exit_timing`](crate::Vcpu::enable_exit_timing)), a latency histogram
/// per exit reason of the time spent in the VMM per exit: from `KVM_RUN` returning to
/// the vCPU's next `KVM_RUN` call.
///
/// Written only by the vCPU's own thread (a plain load and store, no locked
/// read-modify-write on the exit path, nothing allocated); readable from any thread at
/// any time.
#[derive(Debug, Default)]
pub struct ExitStats {
    counts: [AtomicU64; ExitKind::ALL.len()],
    timing: AtomicBool,
    latency: [AtomicHistogram; ExitKind::ALL.len()],
}

impl ExitStats {
    /// Counts one exit. Call only from the thread running the vCPU.
    #[inline]
    pub(crate) fn record(&self, kind: ExitKind) {
        bump(&self.counts[kind as usize], 1);
    }

    /// Records the time one exit of `kind` spent in the VMM. Call only from the thread
    /// running the vCPU.
    #[inline]
    pub(crate) fn record_latency(&self, kind: ExitKind, ns: u64) {
        self.latency[kind as usize].record(ns);
    }

    /// Marks the latencies as being recorded.
    pub(crate) fn set_timing(&self) {
        self.timing.store(true, Ordering::Relaxed);
    }

    /// Whether exit timing is on for this vCPU.
    pub fn timing_enabled(&self) -> bool {
        self.timing.load(Ordering::Relaxed)
    }

    /// The number of exits of `kind` so far.
    pub fn get(&self, kind: ExitKind) -> u64 {
        self.counts[kind as usize].load(Ordering::Relaxed)
    }

    /// All exits so far.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Non-zero counters, in [`ExitKind::ALL`] order.
    pub fn snapshot(&self) -> Vec<(ExitKind, u64)> {
        ExitKind::ALL
            .iter()
            .map(|&k| (k, self.get(k)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    /// The latency histogram of exits of `kind` so far (empty while timing is off).
    pub fn latency(&self, kind: ExitKind) -> LatencyHistogram {
        self.latency[kind as usize].snapshot()
    }

    /// Counters and histograms so far, as one vCPU's [`ExitProfile`].
    pub fn profile(&self) -> ExitProfile {
        ExitProfile {
            vcpus: 1,
            timed: self.timing_enabled(),
            counts: std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed)),
            latency: std::array::from_fn(|i| self.latency[i].snapshot()),
        }
    }
}

/// Exit counts and latency histograms per exit reason, of one vCPU or merged over
/// several ([`ExitProfile::merge`]); [`fmt::Display`] prints it as a table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExitProfile {
    /// vCPUs summed.
    pub vcpus: u32,
    /// Whether latencies were recorded (on every vCPU summed).
    pub timed: bool,
    /// Exits per reason, indexed by `ExitKind as usize`.
    pub counts: [u64; ExitKind::ALL.len()],
    /// Time in the VMM per exit, per reason, indexed by `ExitKind as usize`.
    pub latency: [LatencyHistogram; ExitKind::ALL.len()],
}

impl ExitProfile {
    /// Adds another vCPU's (or profile's) counts and histograms to this one.
    pub fn merge(&mut self, other: &ExitProfile) {
        self.timed = if self.vcpus == 0 {
            other.timed
        } else {
            self.timed && other.timed
        };
        self.vcpus += other.vcpus;
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
            mine.merge(theirs);
        }
    }

    /// Exits of `kind`.
    pub fn count(&self, kind: ExitKind) -> u64 {
        self.counts[kind as usize]
    }

    /// The latency histogram of `kind`.
    pub fn latency(&self, kind: ExitKind) -> &LatencyHistogram {
        &self.latency[kind as usize]
    }

    /// All exits.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// All timed exits, over every reason.
    pub fn timed_total(&self) -> LatencyHistogram {
        let mut all = LatencyHistogram::default();
        for h in &self.latency {
            all.merge(h);
        }
        all
    }
}

impl fmt::Display for ExitProfile {
    /// A table: one row per exit reason seen, with its count and, when timed, how many
    /// exits were timed, mean, p50 and p99 (as bucket bounds), max, and the histogram
    /// over the buckets that are not empty for every reason.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vcpus = if self.vcpus == 1 { "vCPU" } else { "vCPUs" };
        writeln!(
            f,
            "exit profile: {} exits on {} {vcpus}",
            self.total(),
            self.vcpus
        )?;
        let kinds: Vec<ExitKind> = ExitKind::ALL
            .iter()
            .copied()
            .filter(|&k| self.count(k) > 0)
            .collect();
        if !self.timed {
            writeln!(f, "{:<14} {:>10}", "reason", "exits")?;
            for &k in &kinds {
                writeln!(f, "{:<14} {:>10}", k.name(), self.count(k))?;
            }
            return Ok(());
        }
        writeln!(
            f,
            "time in the VMM per exit (KVM_RUN returning to the next KVM_RUN); \
             histogram columns count exits"
        )?;
        let all = self.timed_total();
        let used: Vec<usize> = (0..LATENCY_BUCKETS)
            .filter(|&b| all.buckets[b] > 0)
            .collect();
        let columns: Vec<usize> = match (used.first(), used.last()) {
            (Some(&lo), Some(&hi)) => (lo..=hi).collect(),
            _ => Vec::new(),
        };
        write!(
            f,
            "{:<14} {:>10} {:>10} {:>7} {:>7} {:>7} {:>7} |",
            "reason", "exits", "timed", "mean", "p50", "p99", "max"
        )?;
        for &b in &columns {
            write!(f, " {:>8}", latency_bucket_label(b))?;
        }
        writeln!(f)?;
        let quantile = |h: &LatencyHistogram, q: f64| {
            h.quantile_bucket(q)
                .map_or_else(|| "-".to_string(), latency_bucket_label)
        };
        let mut row = |name: &str, count: u64, h: &LatencyHistogram| -> fmt::Result {
            let timed = h.count();
            let (mean, max) = match h.mean_ns() {
                Some(mean) => (format_ns(mean.round() as u64), format_ns(h.max_ns)),
                None => ("-".to_string(), "-".to_string()),
            };
            write!(
                f,
                "{:<14} {:>10} {:>10} {:>7} {:>7} {:>7} {:>7} |",
                name,
                count,
                timed,
                mean,
                quantile(h, 0.5),
                quantile(h, 0.99),
                max
            )?;
            if timed > 0 {
                for &b in &columns {
                    write!(f, " {:>8}", h.buckets[b])?;
                }
            }
            writeln!(f)
        };
        for &k in &kinds {
            row(k.name(), self.count(k), self.latency(k))?;
        }
        if kinds.len() > 1 {
            row("all", self.total(), &all)?;
        }
        writeln!(
            f,
            "(exits that end the run loop, such as the last one of each vCPU, are not timed)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_kind() {
        let stats = ExitStats::default();
        stats.record(ExitKind::IoOut);
        stats.record(ExitKind::IoOut);
        stats.record(ExitKind::Other);
        assert_eq!(stats.get(ExitKind::IoOut), 2);
        assert_eq!(stats.get(ExitKind::IoIn), 0);
        assert_eq!(stats.total(), 3);
        assert_eq!(
            stats.snapshot(),
            vec![(ExitKind::IoOut, 2), (ExitKind::Other, 1)]
        );
        for (i, k) in ExitKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }

    #[test]
    fn bucket_boundaries() {
        // Below 64 ns, then one bucket per doubling, the last one open-ended.
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 0);
        assert_eq!(latency_bucket(63), 0);
        for i in 1..LATENCY_BUCKETS - 1 {
            let lo = 64u64 << (i - 1);
            let hi = 64u64 << i;
            assert_eq!(latency_bucket(lo), i, "{lo}");
            assert_eq!(latency_bucket(hi - 1), i, "{}", hi - 1);
            assert_eq!(latency_bucket_bound_ns(i - 1), Some(lo));
            assert_eq!(latency_bucket_bound_ns(i), Some(hi));
        }
        let last = LATENCY_BUCKETS - 1;
        assert_eq!(latency_bucket((64 << 14) - 1), last - 1);
        assert_eq!(latency_bucket(64 << 14), last);
        assert_eq!(latency_bucket(1 << 40), last);
        assert_eq!(latency_bucket(u64::MAX), last);
        assert_eq!(latency_bucket_bound_ns(last), None);
        assert_eq!(latency_bucket_bound_ns(last + 1), None);
        // 1 ms sits in the bucket that ends at 1.05 ms.
        assert_eq!(latency_bucket(1_000_000), last - 1);
    }

    #[test]
    fn bucket_labels_and_units() {
        let labels: Vec<String> = (0..LATENCY_BUCKETS).map(latency_bucket_label).collect();
        assert_eq!(
            labels,
            [
                "<64ns", "<128ns", "<256ns", "<512ns", "<1.0us", "<2.0us", "<4.1us", "<8.2us",
                "<16us", "<33us", "<66us", "<131us", "<262us", "<524us", "<1.05ms", ">=1.05ms"
            ]
        );
        assert_eq!(format_ns(0), "0ns");
        assert_eq!(format_ns(999), "999ns");
        assert_eq!(format_ns(1_000), "1.0us");
        assert_eq!(format_ns(9_949), "9.9us");
        assert_eq!(format_ns(123_456), "123us");
        assert_eq!(format_ns(12_345_678), "12ms");
        assert_eq!(format_ns(2_500_000_000), "2.50s");
    }

    #[test]
    fn histogram_records_sum_max_and_quantiles() {
        let mut h = LatencyHistogram::default();
        assert_eq!(
            (h.count(), h.mean_ns(), h.quantile_bucket(0.5)),
            (0, None, None)
        );
        for ns in [10, 100, 100, 100, 5_000] {
            h.record(ns);
        }
        assert_eq!(h.count(), 5);
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[1], 3);
        assert_eq!(h.buckets[latency_bucket(5_000)], 1);
        assert_eq!(h.total_ns, 5_310);
        assert_eq!(h.max_ns, 5_000);
        assert_eq!(h.mean_ns(), Some(1_062.0));
        assert_eq!(h.quantile_bucket(0.0), Some(0));
        assert_eq!(h.quantile_bucket(0.5), Some(1));
        assert_eq!(h.quantile_bucket(0.8), Some(1));
        assert_eq!(h.quantile_bucket(0.99), Some(latency_bucket(5_000)));
        assert_eq!(h.quantile_bucket(1.0), Some(latency_bucket(5_000)));
    }

    #[test]
    fn atomic_histogram_matches_the_plain_one() {
        let stats = ExitStats::default();
        let mut plain = LatencyHistogram::default();
        for ns in [0, 63, 64, 700, 70_000, 2_000_000] {
            stats.record_latency(ExitKind::MmioRead, ns);
            plain.record(ns);
        }
        assert_eq!(stats.latency(ExitKind::MmioRead), plain);
        assert_eq!(stats.latency(ExitKind::IoIn), LatencyHistogram::default());
        assert!(!stats.timing_enabled());
        stats.set_timing();
        assert!(stats.profile().timed);
    }

    #[test]
    fn profiles_merge_across_vcpus() {
        let a = ExitStats::default();
        let b = ExitStats::default();
        for _ in 0..3 {
            a.record(ExitKind::IoOut);
            a.record_latency(ExitKind::IoOut, 100);
        }
        a.record(ExitKind::Hlt);
        b.record(ExitKind::IoOut);
        b.record_latency(ExitKind::IoOut, 3_000);
        b.record(ExitKind::MmioWrite);
        b.record_latency(ExitKind::MmioWrite, 50);
        a.set_timing();
        b.set_timing();

        let mut all = ExitProfile::default();
        all.merge(&a.profile());
        all.merge(&b.profile());
        assert_eq!(all.vcpus, 2);
        assert!(all.timed);
        assert_eq!(all.count(ExitKind::IoOut), 4);
        assert_eq!(all.count(ExitKind::Hlt), 1);
        assert_eq!(all.count(ExitKind::MmioWrite), 1);
        assert_eq!(all.total(), 6);
        let io = all.latency(ExitKind::IoOut);
        assert_eq!(io.count(), 4);
        assert_eq!(io.buckets[1], 3);
        assert_eq!(io.buckets[latency_bucket(3_000)], 1);
        assert_eq!((io.total_ns, io.max_ns), (3_300, 3_000));
        assert_eq!(all.timed_total().count(), 5);
        assert_eq!(all.latency(ExitKind::Hlt).count(), 0);

        // Merging in an untimed vCPU makes the whole profile untimed; an empty profile
        // takes the other's flag.
        let mut mixed = all.clone();
        mixed.merge(&ExitStats::default().profile());
        assert!(!mixed.timed);
        assert_eq!(mixed.vcpus, 3);
    }

    #[test]
    fn profile_table_shows_counts_and_used_buckets() {
        let stats = ExitStats::default();
        stats.set_timing();
        for _ in 0..1000 {
            stats.record(ExitKind::IoOut);
            stats.record_latency(ExitKind::IoOut, 150);
        }
        stats.record(ExitKind::Hlt);
        let table = stats.profile().to_string();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "exit profile: 1001 exits on 1 vCPU");
        let header = lines[2];
        assert!(
            header.contains("reason") && header.contains("<256ns"),
            "{table}"
        );
        // Only the bucket that holds something is a column.
        assert!(
            !header.contains("<128ns") && !header.contains("<512ns"),
            "{table}"
        );
        let io: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            io,
            ["io-out", "1000", "1000", "150ns", "<256ns", "<256ns", "150ns", "|", "1000"]
        );
        let hlt: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(hlt, ["hlt", "1", "0", "-", "-", "-", "-", "|"]);
        assert!(lines[5].starts_with("all "), "{table}");

        let untimed = ExitStats::default();
        untimed.record(ExitKind::IoIn);
        assert_eq!(
            untimed.profile().to_string(),
            "exit profile: 1 exits on 1 vCPU\nreason              exits\nio-in                   1\n"
        );
    }
}

//! Medians over repeated runs and the Markdown tables the exit-rate benchmark prints.

use std::fmt::Write as _;

use crate::measure::{Sample, Side};
use crate::process::{MemoryAtExit, ProcessRun};

/// The median of `values` (the mean of the two middle values for an even count), or
/// `None` if there are none. NaNs sort last.
///
/// ```
/// assert_eq!(ember_benches::report::median(&[3.0, 1.0, 2.0]), Some(2.0));
/// assert_eq!(ember_benches::report::median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
/// assert_eq!(ember_benches::report::median(&[]), None);
/// ```
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// Per-exit figures of one way of running one workload: medians over its runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// What ran the guest, for the table.
    pub label: String,
    /// Whether this is the floor the other rows of its workload are compared with.
    pub is_floor: bool,
    /// Whether this is the timed floor, whose measured time between `KVM_RUN` calls
    /// the other timed rows are compared with.
    pub is_timed_floor: bool,
    /// Runs the medians are taken over (for a whole process: runs with N exits, each
    /// matched by as many runs with none).
    pub runs: usize,
    /// Exits in each run.
    pub exits_per_run: u64,
    /// Median wall-clock nanoseconds per exit.
    pub wall_ns: f64,
    /// Median user-mode CPU nanoseconds per exit.
    pub user_ns: f64,
    /// Median system CPU nanoseconds per exit.
    pub system_ns: f64,
    /// Median time in the VMM per exit measured by exit timing, if it was on.
    pub vmm_ns: Option<f64>,
}

impl Summary {
    /// Summarises in-process `samples` (runs with no exits are skipped); `None` if none
    /// is left.
    pub fn new(side: Side, samples: &[Sample]) -> Option<Summary> {
        let samples: Vec<&Sample> = samples.iter().filter(|s| s.exits > 0).collect();
        let per_exit = |f: fn(&Sample) -> f64| -> Option<f64> {
            let values: Vec<f64> = samples.iter().map(|s| f(s) / s.exits as f64).collect();
            median(&values)
        };
        let vmm: Vec<f64> = samples.iter().filter_map(|s| s.vmm_ns).collect();
        Some(Summary {
            label: side.description().to_string(),
            is_floor: side == Side::Floor,
            is_timed_floor: side == Side::FloorTimed,
            runs: samples.len(),
            exits_per_run: samples.first()?.exits,
            wall_ns: per_exit(|s| s.wall.as_nanos() as f64)?,
            user_ns: per_exit(|s| s.cpu.user.as_nanos() as f64)?,
            system_ns: per_exit(|s| s.cpu.system.as_nanos() as f64)?,
            vmm_ns: median(&vmm),
        })
    }

    /// Summarises whole-process runs: `(median(t(N)) - median(t(0))) / N` for each of
    /// wall, user and system time, so that start-up and tear-down cancel out. `None`
    /// without runs or exits.
    pub fn from_processes(
        label: &str,
        exits: u64,
        with_exits: &[ProcessRun],
        without: &[ProcessRun],
    ) -> Option<Summary> {
        if exits == 0 {
            return None;
        }
        let per_exit = |f: fn(&ProcessRun) -> f64| -> Option<f64> {
            let n: Vec<f64> = with_exits.iter().map(f).collect();
            let zero: Vec<f64> = without.iter().map(f).collect();
            Some((median(&n)? - median(&zero)?) / exits as f64)
        };
        Some(Summary {
            label: label.to_string(),
            is_floor: false,
            is_timed_floor: false,
            runs: with_exits.len(),
            exits_per_run: exits,
            wall_ns: per_exit(|r| r.wall.as_nanos() as f64)?,
            user_ns: per_exit(|r| r.user.as_nanos() as f64)?,
            system_ns: per_exit(|r| r.system.as_nanos() as f64)?,
            vmm_ns: None,
        })
    }
}

/// Every way one workload was run; the first row is the floor.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The workload's name.
    pub workload: String,
    /// The rows, floor first.
    pub rows: Vec<Summary>,
}

impl Comparison {
    /// The floor row.
    pub fn floor(&self) -> Option<&Summary> {
        self.rows.iter().find(|r| r.is_floor)
    }

    /// The timed floor's measured time between `KVM_RUN` calls, per exit.
    pub fn timed_floor_ns(&self) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.is_timed_floor)
            .and_then(|r| r.vmm_ns)
    }
}

/// Formats `n` with a comma every three digits, e.g. `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn signed(x: f64) -> String {
    let r = x.round();
    if r > 0.0 {
        format!("+{r:.0}")
    } else if r < 0.0 {
        format!("{r:.0}")
    } else {
        "0".to_string()
    }
}

/// The exit round trip as a Markdown table: one row per way of running each workload;
/// ratios and "beyond floor" figures are against the floor of the same workload, and a
/// measured time between `KVM_RUN` calls is followed by how much it exceeds the timed
/// floor's.
pub fn markdown_table(comparisons: &[Comparison]) -> String {
    let mut out = String::new();
    out.push_str(
        "| workload | run by | exits/run | wall ns/exit | vs floor \
         | user ns/exit | user ns/exit beyond floor | VMM time ns/exit (measured) \
         | sys ns/exit |\n",
    );
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|\n");
    for c in comparisons {
        let floor = c.floor();
        for s in &c.rows {
            let (ratio, beyond) = match floor {
                _ if s.is_floor => ("1.00×".to_string(), "—".to_string()),
                Some(f) if f.wall_ns > 0.0 => (
                    format!("{:.3}×", s.wall_ns / f.wall_ns),
                    signed(s.user_ns - f.user_ns),
                ),
                _ => ("—".to_string(), "—".to_string()),
            };
            let vmm = match (s.vmm_ns, c.timed_floor_ns()) {
                (None, _) => "—".to_string(),
                (Some(v), Some(f)) if !s.is_timed_floor => {
                    format!("{v:.0} ({} beyond floor)", signed(v - f))
                }
                (Some(v), _) => format!("{v:.0}"),
            };
            // Writing to a String cannot fail.
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {} | {:.0} | {} | {} | {:.0} |",
                c.workload,
                s.label,
                thousands(s.exits_per_run),
                s.wall_ns,
                ratio,
                s.user_ns,
                beyond,
                vmm,
                s.system_ns,
            );
        }
    }
    out
}

/// Start-up and footprint of one VMM: medians over its runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Startup {
    /// The VMM.
    pub vmm: String,
    /// Timed runs.
    pub runs: usize,
    /// The VMM's own report of the guest's first I/O exit (`ember`: boot done, timed
    /// from `main()`), in ms.
    pub self_reported_ms: Option<f64>,
    /// From spawning the process to reaping it, in ms.
    pub process_ms: f64,
    /// CPU time (user + system) of the whole process, in ms.
    pub cpu_ms: f64,
    /// Memory at exit (median of the traced runs, by `VmHWM`).
    pub memory: Option<MemoryAtExit>,
}

impl Startup {
    /// Summarises timed `runs` (with the VMM's own reports, if any, in
    /// `self_reported_ms`) and traced runs `traced`.
    pub fn new(
        vmm: &str,
        runs: &[ProcessRun],
        self_reported_ms: &[f64],
        traced: &[ProcessRun],
    ) -> Option<Startup> {
        let wall: Vec<f64> = runs.iter().map(|r| r.wall.as_secs_f64() * 1e3).collect();
        let cpu: Vec<f64> = runs
            .iter()
            .map(|r| (r.user + r.system).as_secs_f64() * 1e3)
            .collect();
        let mut memory: Vec<MemoryAtExit> = traced.iter().filter_map(|r| r.memory).collect();
        memory.sort_by_key(|m| m.hwm_kib);
        Some(Startup {
            vmm: vmm.to_string(),
            runs: runs.len(),
            self_reported_ms: median(self_reported_ms),
            process_ms: median(&wall)?,
            cpu_ms: median(&cpu)?,
            memory: memory.get(memory.len() / 2).copied(),
        })
    }
}

/// Start-up and footprint as a Markdown table.
pub fn startup_table(rows: &[Startup]) -> String {
    let mut out = String::new();
    out.push_str(
        "| VMM | guest's first I/O exit, ms (VMM's own clock, from main) \
         | exec → exit, ms (whole process) | CPU ms, exec → exit | VmHWM KiB \
         | guest RAM resident KiB | VMM's own KiB (VmHWM − guest) |\n",
    );
    out.push_str("|---|--:|--:|--:|--:|--:|--:|\n");
    let kib = |v: Option<u64>| v.map_or_else(|| "—".to_string(), thousands);
    for r in rows {
        let own = r
            .self_reported_ms
            .map_or_else(|| "—".to_string(), |ms| format!("{ms:.2}"));
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.1} | {} | {} | {} |",
            r.vmm,
            own,
            r.process_ms,
            r.cpu_ms,
            kib(r.memory.map(|m| m.hwm_kib)),
            kib(r.memory.and_then(|m| m.guest_kib)),
            kib(r.memory.and_then(|m| m.vmm_kib())),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::CpuTimes;
    use crate::process::Ended;
    use std::time::Duration;

    fn sample(exits: u64, wall_ms: u64, user_ms: u64, sys_ms: u64) -> Sample {
        Sample {
            exits,
            wall: Duration::from_millis(wall_ms),
            cpu: CpuTimes {
                user: Duration::from_millis(user_ms),
                system: Duration::from_millis(sys_ms),
            },
            vmm_ns: None,
        }
    }

    fn process(wall_ms: u64, user_ms: u64, sys_ms: u64, hwm: u64) -> ProcessRun {
        ProcessRun {
            wall: Duration::from_millis(wall_ms),
            user: Duration::from_millis(user_ms),
            system: Duration::from_millis(sys_ms),
            ended: Ended::Exited(0),
            stderr: String::new(),
            memory: Some(MemoryAtExit {
                hwm_kib: hwm,
                rss_kib: hwm.saturating_sub(10),
                guest_kib: Some(100),
            }),
        }
    }

    #[test]
    fn median_of_odd_even_and_unsorted() {
        assert_eq!(median(&[5.0]), Some(5.0));
        assert_eq!(median(&[9.0, 1.0, 5.0]), Some(5.0));
        assert_eq!(median(&[9.0, 1.0, 5.0, 3.0]), Some(4.0));
        assert_eq!(median(&[2.0, 2.0, 100.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn summary_takes_per_metric_medians_per_exit() {
        let mut runs = [
            sample(1000, 6, 1, 5),
            sample(1000, 5, 3, 2),
            sample(1000, 7, 2, 4),
        ];
        runs[0].vmm_ns = Some(90.0);
        runs[2].vmm_ns = Some(110.0);
        let s = Summary::new(Side::EmberTimed, &runs).unwrap();
        assert_eq!(s.runs, 3);
        assert_eq!(s.exits_per_run, 1000);
        assert_eq!(s.wall_ns, 6000.0);
        assert_eq!(s.user_ns, 2000.0);
        assert_eq!(s.system_ns, 4000.0);
        assert_eq!(s.vmm_ns, Some(100.0));
        assert!(!s.is_floor);
        assert!(Summary::new(Side::Floor, &runs[..1]).unwrap().is_floor);
        assert_eq!(Summary::new(Side::Floor, &[]), None);
        assert_eq!(Summary::new(Side::Floor, &[sample(0, 1, 1, 1)]), None);
    }

    #[test]
    fn process_summary_subtracts_the_run_without_exits() {
        let n = [process(1_100, 60, 600, 0), process(1_000, 50, 500, 0)];
        let zero = [process(100, 10, 40, 0), process(120, 30, 60, 0)];
        let s = Summary::from_processes("QEMU", 100_000, &n, &zero).unwrap();
        // (1050 ms - 110 ms) / 100,000 = 9400 ns.
        assert!((s.wall_ns - 9_400.0).abs() < 1e-6, "{s:?}");
        assert!((s.user_ns - 350.0).abs() < 1e-6, "{s:?}");
        assert!((s.system_ns - 5_000.0).abs() < 1e-6, "{s:?}");
        assert_eq!(s.runs, 2);
        assert_eq!(Summary::from_processes("x", 0, &n, &zero), None);
        assert_eq!(Summary::from_processes("x", 1, &n, &[]), None);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(200_000), "200,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn table_rows_and_ratios() {
        let floor = Summary::new(Side::Floor, &[sample(200_000, 1000, 20, 900)]).unwrap();
        let mut timed = sample(200_000, 1100, 30, 950);
        timed.vmm_ns = Some(61.4);
        let ember = Summary::new(Side::EmberTimed, &[timed]).unwrap();
        let table = markdown_table(&[Comparison {
            workload: "PIO".into(),
            rows: vec![floor.clone(), ember.clone()],
        }]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("| workload | run by |"));
        assert_eq!(lines[0].matches('|').count(), lines[1].matches('|').count());
        assert_eq!(
            lines[2],
            "| PIO | floor: bare KVM_RUN loop | 200,000 | 5000 | 1.00× | 100 | — | — | 4500 |"
        );
        assert_eq!(
            lines[3],
            "| PIO | Ember Vcpu::run, exit timing on | 200,000 | 5500 | 1.100× | 150 | +50 \
             | 61 | 4750 |"
        );
        for line in &lines {
            assert_eq!(line.matches('|').count(), 10, "{line}");
        }

        // With a timed floor, timed rows say how far beyond it they are.
        let mut floor_timed = sample(200_000, 1000, 20, 900);
        floor_timed.vmm_ns = Some(20.2);
        let floor_timed = Summary::new(Side::FloorTimed, &[floor_timed]).unwrap();
        let table = markdown_table(&[Comparison {
            workload: "PIO".into(),
            rows: vec![floor, floor_timed, ember],
        }]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[3].contains("| 1.000× | 100 | 0 | 20 | 4500 |"),
            "{}",
            lines[3]
        );
        assert!(
            lines[4].contains("| 61 (+41 beyond floor) |"),
            "{}",
            lines[4]
        );
    }

    #[test]
    fn startup_rows() {
        let runs = [
            process(30, 1, 1, 0),
            process(10, 1, 1, 0),
            process(20, 1, 1, 0),
        ];
        let traced = [process(1, 1, 1, 3000), process(1, 1, 1, 2800)];
        let s = Startup::new("ember", &runs, &[2.0, 3.0, 4.0], &traced).unwrap();
        assert_eq!(s.process_ms, 20.0);
        assert_eq!(s.self_reported_ms, Some(3.0));
        assert_eq!(s.memory.unwrap().hwm_kib, 3000);
        let q = Startup::new("QEMU microvm", &runs, &[], &[]).unwrap();
        let table = startup_table(&[s, q]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[2],
            "| ember | 3.00 | 20.00 | 2.0 | 3,000 | 100 | 2,900 |"
        );
        assert_eq!(lines[3], "| QEMU microvm | — | 20.00 | 2.0 | — | — | — |");
        assert_eq!(Startup::new("x", &[], &[], &[]), None);
    }

    #[test]
    fn beyond_floor_can_be_negative_or_zero() {
        assert_eq!(signed(-12.4), "-12");
        assert_eq!(signed(0.3), "0");
        assert_eq!(signed(-0.3), "0");
        assert_eq!(signed(7.6), "+8");
    }
}

//! Medians over repeated runs and the Markdown table the exit-rate benchmark prints.

use std::fmt::Write as _;

use crate::measure::{Sample, Side};

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

/// Per-exit figures of one side of one workload: the median over its runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Which run loop.
    pub side: Side,
    /// Runs the medians are taken over.
    pub runs: usize,
    /// Exits in each run (the first run's count; every run checks it equals N).
    pub exits_per_run: u64,
    /// Median wall-clock nanoseconds per exit.
    pub wall_ns: f64,
    /// Median user-mode CPU nanoseconds per exit.
    pub user_ns: f64,
    /// Median system CPU nanoseconds per exit.
    pub system_ns: f64,
}

impl Summary {
    /// Summarises `samples` (runs with no exits are skipped); `None` if none is left.
    pub fn new(side: Side, samples: &[Sample]) -> Option<Summary> {
        let samples: Vec<&Sample> = samples.iter().filter(|s| s.exits > 0).collect();
        let per_exit = |f: fn(&Sample) -> f64| -> Option<f64> {
            let values: Vec<f64> = samples.iter().map(|s| f(s) / s.exits as f64).collect();
            median(&values)
        };
        Some(Summary {
            side,
            runs: samples.len(),
            exits_per_run: samples.first()?.exits,
            wall_ns: per_exit(|s| s.wall.as_nanos() as f64)?,
            user_ns: per_exit(|s| s.cpu.user.as_nanos() as f64)?,
            system_ns: per_exit(|s| s.cpu.system.as_nanos() as f64)?,
        })
    }

    /// Exits per second at the median wall time per exit.
    pub fn exits_per_second(&self) -> f64 {
        if self.wall_ns > 0.0 {
            1e9 / self.wall_ns
        } else {
            0.0
        }
    }
}

/// The floor and Ember summaries of one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The workload's name.
    pub workload: String,
    /// The bare `KVM_RUN` loop.
    pub floor: Summary,
    /// Ember's run loop.
    pub ember: Summary,
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

/// The comparison as a Markdown table: one row per side and workload; ratios and
/// "beyond floor" figures are Ember's minus (or over) the floor of the same workload.
pub fn markdown_table(comparisons: &[Comparison]) -> String {
    let mut out = String::new();
    out.push_str(
        "| workload | side | exits/run | wall ns/exit | vs floor | exits/s \
         | user ns/exit | user ns/exit beyond floor | sys ns/exit |\n",
    );
    out.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|\n");
    for c in comparisons {
        for s in [&c.floor, &c.ember] {
            let (ratio, beyond) = if s.side == Side::Floor {
                ("1.00×".to_string(), "—".to_string())
            } else {
                let ratio = if c.floor.wall_ns > 0.0 {
                    format!("{:.2}×", s.wall_ns / c.floor.wall_ns)
                } else {
                    "—".to_string()
                };
                (ratio, signed(s.user_ns - c.floor.user_ns))
            };
            // Writing to a String cannot fail.
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {} | {} | {:.0} | {} | {:.0} |",
                c.workload,
                s.side.name(),
                thousands(s.exits_per_run),
                s.wall_ns,
                ratio,
                thousands(s.exits_per_second().round() as u64),
                s.user_ns,
                beyond,
                s.system_ns,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::measure::CpuTimes;
    use std::time::Duration;

    fn sample(exits: u64, wall_ms: u64, user_ms: u64, sys_ms: u64) -> Sample {
        Sample {
            exits,
            wall: Duration::from_millis(wall_ms),
            cpu: CpuTimes {
                user: Duration::from_millis(user_ms),
                system: Duration::from_millis(sys_ms),
            },
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
        let s = Summary::new(
            Side::Ember,
            &[
                sample(1000, 6, 1, 5),
                sample(1000, 5, 3, 2),
                sample(1000, 7, 2, 4),
            ],
        )
        .unwrap();
        assert_eq!(s.runs, 3);
        assert_eq!(s.exits_per_run, 1000);
        assert_eq!(s.wall_ns, 6000.0);
        assert_eq!(s.user_ns, 2000.0);
        assert_eq!(s.system_ns, 4000.0);
        assert!((s.exits_per_second() - 166_666.67).abs() < 0.01);
        assert_eq!(Summary::new(Side::Floor, &[]), None);
        assert_eq!(Summary::new(Side::Floor, &[sample(0, 1, 1, 1)]), None);
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
        let ember = Summary::new(Side::Ember, &[sample(200_000, 1100, 30, 950)]).unwrap();
        let table = markdown_table(&[Comparison {
            workload: "PIO".into(),
            floor,
            ember,
        }]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("| workload | side |"));
        assert_eq!(lines[0].matches('|').count(), lines[1].matches('|').count());
        assert_eq!(
            lines[2],
            "| PIO | floor | 200,000 | 5000 | 1.00× | 200,000 | 100 | — | 4500 |"
        );
        assert_eq!(
            lines[3],
            "| PIO | ember | 200,000 | 5500 | 1.10× | 181,818 | 150 | +50 | 4750 |"
        );
        for line in &lines {
            assert_eq!(line.matches('|').count(), 10, "{line}");
        }
    }

    #[test]
    fn beyond_floor_can_be_negative_or_zero() {
        assert_eq!(signed(-12.4), "-12");
        assert_eq!(signed(0.3), "0");
        assert_eq!(signed(-0.3), "0");
        assert_eq!(signed(7.6), "+8");
    }
}

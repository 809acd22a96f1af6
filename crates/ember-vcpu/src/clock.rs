//! The clock exit timing reads ([`ExitClock`]): the CPU's time-stamp counter where the
//! kernel itself keeps time with it, else `CLOCK_MONOTONIC` (what `Instant::now()`
//! reads). Public so that other loops (a benchmark's bare `KVM_RUN` loop, say) can be
//! timed the same way.
//!
//! A pair of `rdtsc` costs about a third of a pair of `clock_gettime` calls (measured
//! on the nested development hosts: 25-45 ns against 70-100 ns per pair), and exit
//! timing reads one pair per exit, so the cheaper clock keeps the measurement from
//! inflating what it measures. The counter is used only when the kernel's clocksource
//! is `tsc` (so the kernel has checked that it is invariant and synchronised across
//! CPUs) and `rdtsc` is allowed in user mode; its rate is calibrated once per process
//! against `CLOCK_MONOTONIC` over about a millisecond.

use std::sync::OnceLock;

/// A clock for exit timing: raw readings ([`ExitClock::now`]) are turned into
/// nanoseconds only for differences ([`ExitClock::nanos`]).
///
/// ```
/// use ember_vcpu::clock::ExitClock;
/// let clock = ExitClock::get();
/// let start = clock.now();
/// std::thread::sleep(std::time::Duration::from_millis(2));
/// assert!(clock.nanos(start, clock.now()) >= 1_000_000);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitClock(Kind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `rdtsc`; nanoseconds = ticks × `mult` / 2^32.
    #[cfg(target_arch = "x86_64")]
    Tsc {
        /// 2^32 × nanoseconds per tick.
        mult: u64,
    },
    /// `clock_gettime(CLOCK_MONOTONIC)`, read as nanoseconds.
    Monotonic,
}

impl ExitClock {
    /// The process's exit clock, chosen (and calibrated, which takes about a
    /// millisecond) on first use.
    pub fn get() -> ExitClock {
        static CLOCK: OnceLock<ExitClock> = OnceLock::new();
        *CLOCK.get_or_init(|| ExitClock(choose()))
    }

    /// `tsc` or `CLOCK_MONOTONIC`, and for the TSC its calibrated rate.
    pub fn describe(self) -> String {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            Kind::Tsc { mult } => format!("tsc at {:.3} GHz", (1u64 << 32) as f64 / mult as f64),
            Kind::Monotonic => "CLOCK_MONOTONIC".to_string(),
        }
    }

    /// A raw reading.
    #[inline]
    pub fn now(self) -> u64 {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `rdtsc` has no memory effects; `choose` checked that it is
            // allowed in user mode (only it makes a `Kind::Tsc`).
            Kind::Tsc { .. } => unsafe { core::arch::x86_64::_rdtsc() },
            Kind::Monotonic => monotonic_ns(),
        }
    }

    /// Nanoseconds between raw readings `from` and `to` (0 if the clock went back).
    #[inline]
    pub fn nanos(self, from: u64, to: u64) -> u64 {
        let ticks = to.saturating_sub(from);
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            Kind::Tsc { mult } => ((u128::from(ticks) * u128::from(mult)) >> 32) as u64,
            Kind::Monotonic => ticks,
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

#[cfg(target_arch = "x86_64")]
fn choose() -> Kind {
    let clocksource =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .unwrap_or_default();
    // SAFETY: PR_GET_TSC writes an int through the pointer given.
    let tsc_allowed = unsafe {
        let mut state: libc::c_int = 0;
        libc::prctl(libc::PR_GET_TSC, &mut state as *mut libc::c_int) == 0
            && state == libc::PR_TSC_ENABLE
    };
    if clocksource.trim() != "tsc" || !tsc_allowed {
        log::debug!("exit timing reads CLOCK_MONOTONIC (clocksource {clocksource:?})");
        return Kind::Monotonic;
    }
    match calibrate_tsc() {
        Some(mult) => {
            log::debug!(
                "exit timing reads the TSC, {:.3} GHz",
                (1u64 << 32) as f64 / mult as f64
            );
            Kind::Tsc { mult }
        }
        None => Kind::Monotonic,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn choose() -> Kind {
    Kind::Monotonic
}

/// A TSC reading and a `CLOCK_MONOTONIC` reading taken together: the monotonic read is
/// bracketed by two TSC reads, and the tightest of a few brackets is kept.
#[cfg(target_arch = "x86_64")]
fn paired_reading() -> (u64, u64) {
    let mut best = (u64::MAX, 0, 0);
    for _ in 0..5 {
        // SAFETY: as in `ExitClock::now`.
        let before = unsafe { core::arch::x86_64::_rdtsc() };
        let ns = monotonic_ns();
        // SAFETY: as above.
        let after = unsafe { core::arch::x86_64::_rdtsc() };
        let gap = after.wrapping_sub(before);
        if gap < best.0 {
            best = (gap, before + gap / 2, ns);
        }
    }
    (best.1, best.2)
}

/// 2^32 × nanoseconds per TSC tick, measured over about a millisecond, or `None` if
/// the counter does not move forward at a plausible rate (50 MHz to 50 GHz).
#[cfg(target_arch = "x86_64")]
fn calibrate_tsc() -> Option<u64> {
    let (tsc0, ns0) = paired_reading();
    while monotonic_ns().saturating_sub(ns0) < 1_000_000 {
        std::hint::spin_loop();
    }
    let (tsc1, ns1) = paired_reading();
    let ticks = tsc1.checked_sub(tsc0)?;
    let ns = ns1.checked_sub(ns0)?;
    let mult = (u128::from(ns) << 32) / u128::from(ticks.max(1));
    let ghz = ticks as f64 / ns as f64;
    (0.05..=50.0)
        .contains(&ghz)
        .then(|| u64::try_from(mult).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_measures_a_sleep() {
        let clock = ExitClock::get();
        let from = clock.now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let ns = clock.nanos(from, clock.now());
        // Lower bound only: a busy machine may oversleep by any amount.
        assert!(ns >= 19_000_000, "{clock:?}: {ns} ns");
        assert_eq!(clock.nanos(10, 5), 0);
    }

    #[test]
    fn monotonic_clock_counts_nanoseconds() {
        assert_eq!(ExitClock(Kind::Monotonic).nanos(1_000, 3_500), 2_500);
        assert_eq!(ExitClock(Kind::Monotonic).describe(), "CLOCK_MONOTONIC");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tsc_ticks_scale_to_nanoseconds() {
        // 2.5 GHz: 0.4 ns per tick.
        let clock = ExitClock(Kind::Tsc {
            mult: (0.4 * (1u64 << 32) as f64) as u64,
        });
        assert_eq!(clock.describe(), "tsc at 2.500 GHz");
        assert_eq!(clock.nanos(0, 2_500_000_000), 999_999_999);
        assert_eq!(clock.nanos(100, 350), 99);
    }
}

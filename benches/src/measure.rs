//! The in-process run loops being compared, timed the same way: the floor, and Ember's
//! run loop with exit timing off and on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_bus::{Bus, BusKind};
use ember_vcpu::clock::ExitClock;
use ember_vcpu::{ExitKind, VcpuOutcome};
use kvm_ioctls::VcpuExit;

use crate::device::{Register, REGISTER_LEN};
use crate::guest::Workload;
use crate::vm::BenchVm;
use crate::Error;

/// Which run loop handles the exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A bare loop around `VcpuFd::run()` that only counts exits: what any VMM adds to.
    Floor,
    /// The same, timing each exit with Ember's exit clock exactly as Ember's exit
    /// timing does: what a bare loop spends between `KVM_RUN` calls, measured the
    /// same way.
    FloorTimed,
    /// [`ember_vcpu::Vcpu::run`] dispatching to an [`ember_bus::Bus`] with one
    /// [`Register`] at the workload's address.
    Ember,
    /// The same with exit timing on ([`ember_vcpu::Vcpu::enable_exit_timing`]).
    EmberTimed,
}

impl Side {
    /// Every side, in the order they run and are reported.
    pub const ALL: [Side; 4] = [Side::Floor, Side::FloorTimed, Side::Ember, Side::EmberTimed];

    /// `floor`, `ember` or `ember-timed`.
    pub fn name(self) -> &'static str {
        match self {
            Side::Floor => "floor",
            Side::FloorTimed => "floor-timed",
            Side::Ember => "ember",
            Side::EmberTimed => "ember-timed",
        }
    }

    /// What the side is, for tables.
    pub fn description(self) -> &'static str {
        match self {
            Side::Floor => "floor: bare KVM_RUN loop",
            Side::FloorTimed => "floor, exits timed like Ember's",
            Side::Ember => "Ember Vcpu::run, exit timing off",
            Side::EmberTimed => "Ember Vcpu::run, exit timing on",
        }
    }
}

/// User and system CPU time consumed by the calling thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// Time in user mode.
    pub user: Duration,
    /// Time in the kernel (for a vCPU thread that includes `KVM_RUN`).
    pub system: Duration,
}

fn timeval(tv: libc::timeval) -> Duration {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let micros = u32::try_from(tv.tv_usec).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(u64::from(micros))
}

/// `getrusage(RUSAGE_THREAD)`: the calling thread's CPU times.
///
/// Kernels without `CONFIG_VIRT_CPU_ACCOUNTING_GEN` split the time between user and
/// system by sampling at the scheduler tick (every 4 ms at `HZ=250`), so a run needs
/// many ticks for the split to mean much.
pub fn thread_cpu_times() -> Result<CpuTimes, Error> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable `rusage`; getrusage writes only into it.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::Rusage(std::io::Error::last_os_error()));
    }
    // SAFETY: zero is a valid `rusage` and getrusage succeeded, filling it in.
    let usage = unsafe { usage.assume_init() };
    Ok(CpuTimes {
        user: timeval(usage.ru_utime),
        system: timeval(usage.ru_stime),
    })
}

/// One timed run of a guest.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// PIO or MMIO write exits of the loop (counted by the floor loop, or by the device
    /// on Ember's side); the final debug-exit write and `hlt` exits are not included.
    pub exits: u64,
    /// Wall-clock time of the run loop.
    pub wall: Duration,
    /// CPU time of the vCPU thread during the run loop.
    pub cpu: CpuTimes,
    /// With exit timing on: the mean time in the VMM per loop exit, from `KVM_RUN`
    /// returning to the next `KVM_RUN` call, in nanoseconds.
    pub vmm_ns: Option<f64>,
}

/// Times `run`, which drives the vCPU until the guest halts, on this thread.
fn timed<T>(run: impl FnOnce() -> Result<T, Error>) -> Result<(T, Duration, CpuTimes), Error> {
    let cpu_before = thread_cpu_times()?;
    let start = Instant::now();
    let result = run()?;
    let wall = start.elapsed();
    let cpu_after = thread_cpu_times()?;
    let cpu = CpuTimes {
        user: cpu_after.user.saturating_sub(cpu_before.user),
        system: cpu_after.system.saturating_sub(cpu_before.system),
    };
    Ok((result, wall, cpu))
}

fn check_count(side: Side, counter: &'static str, expected: u32, seen: u64) -> Result<(), Error> {
    if seen == u64::from(expected) {
        Ok(())
    } else {
        Err(Error::ExitCount {
            side: side.name(),
            counter,
            expected: u64::from(expected),
            seen,
        })
    }
}

/// Runs `workload` for `iterations` writes on `side`, and checks that the loop saw
/// exactly `iterations` write exits.
pub fn run(side: Side, workload: Workload, iterations: u32) -> Result<Sample, Error> {
    match side {
        Side::Floor => run_floor(workload, iterations, false),
        Side::FloorTimed => run_floor(workload, iterations, true),
        Side::Ember => run_ember(workload, iterations, false),
        Side::EmberTimed => run_ember(workload, iterations, true),
    }
}

/// The floor: a bare `KVM_RUN` loop that counts PIO/MMIO write exits and does nothing
/// else. The guest's last write (to the debug-exit port) is counted and taken off.
/// With `timing`, each write exit is timed from `KVM_RUN` returning to the next
/// `KVM_RUN` call with [`ExitClock`], as [`ember_vcpu::Vcpu::enable_exit_timing`] does.
pub fn run_floor(workload: Workload, iterations: u32, timing: bool) -> Result<Sample, Error> {
    let side = if timing {
        Side::FloorTimed
    } else {
        Side::Floor
    };
    let vm = BenchVm::new(&workload.image(iterations)?)?;
    let mut fd = vm.raw_vcpu()?;
    let clock = timing.then(ExitClock::get);
    let ((exits, timed_ns), wall, cpu) = timed(|| {
        let mut exits = 0u64;
        let mut timed_ns = 0u64;
        let mut returned = None;
        loop {
            if let (Some(clock), Some(at)) = (clock, returned.take()) {
                timed_ns += clock.nanos(at, clock.now());
            }
            let exit = fd.run();
            let at = clock.map(ExitClock::now);
            match exit {
                Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::MmioWrite(..)) => {
                    exits += 1;
                    returned = at;
                }
                Ok(VcpuExit::Hlt) => return Ok((exits, timed_ns)),
                Ok(other) => {
                    return Err(Error::UnexpectedExit {
                        side: side.name(),
                        exit: format!("{other:?}"),
                    })
                }
                Err(source) => {
                    return Err(Error::Kvm {
                        op: "KVM_RUN",
                        source,
                    })
                }
            }
        }
    })?;
    check_count(side, "the floor loop", iterations, exits.saturating_sub(1))?;
    Ok(Sample {
        exits: exits.saturating_sub(1),
        wall,
        cpu,
        vmm_ns: (timing && exits > 0).then(|| timed_ns as f64 / exits as f64),
    })
}

/// Ember: [`ember_vcpu::Vcpu::run`] with a [`Register`] at the workload's address on
/// the PIO or MMIO bus, with exit timing on if `timing`. The debug-exit write at the end
/// finds no device (it is dropped and counted by the bus).
pub fn run_ember(workload: Workload, iterations: u32, timing: bool) -> Result<Sample, Error> {
    let side = if timing {
        Side::EmberTimed
    } else {
        Side::Ember
    };
    let vm = BenchVm::new(&workload.image(iterations)?)?;
    let pio = Arc::new(Bus::new(BusKind::Pio));
    let mmio = Arc::new(Bus::new(BusKind::Mmio));
    let device = Arc::new(Register::default());
    let (bus, kind) = match workload {
        Workload::Pio => (&pio, ExitKind::IoOut),
        Workload::Mmio => (&mmio, ExitKind::MmioWrite),
    };
    bus.insert(workload.address(), REGISTER_LEN, device.clone())?;
    let mut vcpu = vm.ember_vcpu(pio, mmio)?;
    if timing {
        vcpu.enable_exit_timing();
    }
    let stats = vcpu.stats();
    let (outcome, wall, cpu) = timed(|| Ok(vcpu.run()?))?;
    if outcome != VcpuOutcome::Halted {
        return Err(Error::UnexpectedExit {
            side: side.name(),
            exit: format!("{outcome:?}"),
        });
    }
    let exits = device.writes();
    check_count(side, "the device", iterations, exits)?;
    // The loop's writes, and the debug-exit write (a port write) after them.
    let io_out = stats.get(ExitKind::IoOut);
    let loop_exits = match workload {
        Workload::Pio => io_out.saturating_sub(1),
        Workload::Mmio => stats.get(ExitKind::MmioWrite),
    };
    check_count(side, "ExitStats", iterations, loop_exits)?;
    let vmm_ns = if timing {
        stats.latency(kind).mean_ns()
    } else {
        None
    };
    Ok(Sample {
        exits,
        wall,
        cpu,
        vmm_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_guests::testing::kvm_available;

    #[test]
    fn thread_cpu_times_grow_with_work() {
        let before = thread_cpu_times().unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = thread_cpu_times().unwrap();
        assert!(after.user + after.system > before.user + before.system);
    }

    #[test]
    fn both_sides_see_exactly_n_exits() {
        if !kvm_available("both_sides_see_exactly_n_exits") {
            return;
        }
        for workload in Workload::ALL {
            for side in Side::ALL {
                let sample = run(side, workload, 1000)
                    .unwrap_or_else(|e| panic!("{} {}: {e}", side.name(), workload.name()));
                assert_eq!(sample.exits, 1000, "{} {}", side.name(), workload.name());
                assert!(sample.wall > Duration::ZERO);
                assert_eq!(
                    sample.vmm_ns.is_some(),
                    matches!(side, Side::EmberTimed | Side::FloorTimed),
                    "{} {}",
                    side.name(),
                    workload.name()
                );
            }
        }
    }

    #[test]
    fn zero_iterations_is_just_the_halt() {
        if !kvm_available("zero_iterations_is_just_the_halt") {
            return;
        }
        assert_eq!(run_floor(Workload::Pio, 0, false).unwrap().exits, 0);
        assert_eq!(run_ember(Workload::Mmio, 0, false).unwrap().exits, 0);
    }
}

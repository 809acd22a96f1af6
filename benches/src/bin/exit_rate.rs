//! Whole-VM exit-rate benchmark: a bare `KVM_RUN` loop (the floor) against Ember's
//! `Vcpu::run` with a bus and a trivial device, on the same guest and VM set-up.
//!
//! `cargo run --release -p ember-benches --bin exit-rate [-- --iterations N --repeat R]`

use std::error::Error;
use std::fs::OpenOptions;
use std::process::ExitCode;

use ember_benches::args::{self, Command, Options};
use ember_benches::guest::Workload;
use ember_benches::measure::{self, Sample, Side};
use ember_benches::report::{markdown_table, Comparison, Summary};

/// Warm-up writes per side before anything is measured (not reported).
const WARM_UP_ITERATIONS: u32 = 10_000;

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let options = match args::parse(argv.iter().skip(1).cloned()) {
        Ok(Command::Run(options)) => options,
        Ok(Command::Help) => {
            println!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("exit-rate: {e}\n\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        eprintln!("!!! KVM UNAVAILABLE: exit-rate cannot run: cannot open /dev/kvm: {e}");
        return ExitCode::FAILURE;
    }
    match run(&options, &argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exit-rate: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(options: &Options, argv: &[String]) -> Result<(), Box<dyn Error>> {
    let sides = [Side::Floor, Side::Ember];
    let load_before = load_average();
    eprintln!(
        "exit-rate: {} writes per run, {} run(s) per side, interleaved; warming up...",
        options.iterations, options.repeat
    );
    for workload in Workload::ALL {
        for side in sides {
            measure::run(side, workload, WARM_UP_ITERATIONS.min(options.iterations))?;
        }
    }

    let mut comparisons = Vec::new();
    for workload in Workload::ALL {
        let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
        for r in 0..options.repeat {
            for (i, side) in sides.into_iter().enumerate() {
                let s = measure::run(side, workload, options.iterations)?;
                eprintln!(
                    "  {} {} run {}/{}: {:.0} ns/exit wall, {:.0} user, {:.0} sys",
                    workload.name(),
                    side.name(),
                    r + 1,
                    options.repeat,
                    s.wall.as_nanos() as f64 / s.exits as f64,
                    s.cpu.user.as_nanos() as f64 / s.exits as f64,
                    s.cpu.system.as_nanos() as f64 / s.exits as f64,
                );
                samples[i].push(s);
            }
        }
        let summary = |i: usize| {
            Summary::new(sides[i], &samples[i]).ok_or("a run loop saw no exits to summarise")
        };
        comparisons.push(Comparison {
            workload: workload.name().to_string(),
            floor: summary(0)?,
            ember: summary(1)?,
        });
    }

    let extra: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    let cargo = if extra.is_empty() {
        "cargo run --release -p ember-benches --bin exit-rate".to_string()
    } else {
        format!(
            "cargo run --release -p ember-benches --bin exit-rate -- {}",
            extra.join(" ")
        )
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let nested = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "nested, kvm_pvm: guest CPL0 code is emulated"
    } else {
        "kvm_pvm not loaded"
    };

    println!("### Exit rate: bare KVM_RUN loop (floor) vs Ember's Vcpu::run\n");
    println!("Command: `{cargo}` (argv: `{}`)\n", argv.join(" "));
    let load_after = load_average();
    println!(
        "Host kernel {kernel} ({nested}); 1-min load average {load_before} before, \
         {load_after} after; guest at CPL0 loops `access; dec ecx; jnz`, then \
         `hlt`. Median of {} interleaved runs per side of {} writes each, after a warm-up \
         of {} per side. CPU times are `getrusage(RUSAGE_THREAD)` of the vCPU thread \
         (tick-sampled unless the kernel has VIRT_CPU_ACCOUNTING_GEN).\n",
        options.repeat,
        options.iterations,
        WARM_UP_ITERATIONS.min(options.iterations),
    );
    print!("{}", markdown_table(&comparisons));
    Ok(())
}

/// The 1-minute load average, to tell a quiet machine from a busy one.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

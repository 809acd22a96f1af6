//! Exit round trip and start-up/footprint benchmark: a bare `KVM_RUN` loop (the floor),
//! Ember's `Vcpu::run` (exit timing off and on), the `ember` binary and QEMU
//! `-M microvm`, all on the same PVH guest image.
//!
//! `cargo run --release -p ember-benches --bin exit-rate [-- --help]`

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use ember_benches::args::{self, Command as Cli, Options};
use ember_benches::guest::{self, Workload};
use ember_benches::measure::{self, Sample, Side};
use ember_benches::process::{self, ProcessRun, Vmm, VmmKind};
use ember_benches::report::{markdown_table, startup_table, Comparison, Startup, Summary};

/// Warm-up writes per side before anything is measured (not reported).
const WARM_UP_ITERATIONS: u32 = 10_000;
/// Traced (memory) start-up runs per VMM.
const TRACED_RUNS: usize = 3;
/// The pause before each start-up run.
const STARTUP_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
/// QEMU's `-cpu` values to try, in order: `host` (as asked for), then `host` without
/// `arch-capabilities`, whose MSR nested KVM hosts may refuse (QEMU 7.2 then aborts
/// with "failed to set MSR 0x10a").
const QEMU_CPUS: [&str; 2] = ["host", "host,-arch-capabilities"];

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let options = match args::parse(argv.iter().skip(1).cloned()) {
        Ok(Cli::Run(options)) => options,
        Ok(Cli::Help) => {
            println!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("exit-rate: {e}\n\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    ember_benches::run_with_kvm("exit-rate", || run(&options, &argv))
}

/// A directory of guest images, removed when dropped.
struct Images {
    dir: PathBuf,
}

impl Images {
    fn new() -> std::io::Result<Images> {
        let dir = std::env::temp_dir().join(format!("ember-exit-rate-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Images { dir })
    }

    fn write(&self, name: &str, image: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::write(&path, image)?;
        Ok(path)
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `ember` binaries: `--ember`, or the one next to this binary (built first when
/// cargo runs us) and, unless `--no-static`, a static-pie build of it.
fn find_ember(options: &Options) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    if !options.ember.is_empty() {
        for path in &options.ember {
            if !process::is_executable(path) {
                return Err(format!("--ember {}: not an executable file", path.display()).into());
            }
        }
        return Ok(options.ember.clone());
    }
    let exe = std::env::current_exe()?;
    let Some(dir) = exe.parent() else {
        return Ok(Vec::new());
    };
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut found = Vec::new();
    let cargo = std::env::var_os("CARGO");
    if let (Some(cargo), Some(target_dir)) = (&cargo, dir.parent()) {
        let build = cargo_build(cargo, target_dir, release, None);
        if !run_build(build)? {
            return Err("building ember failed".into());
        }
    }
    let ember = dir.join("ember");
    if process::is_executable(&ember) {
        found.push(ember);
    }
    if let (Some(cargo), Some(target_dir), false) = (&cargo, dir.parent(), options.no_static) {
        let static_dir = target_dir.join("static-pie");
        let triple = "x86_64-unknown-linux-gnu";
        let build = cargo_build(cargo, &static_dir, release, Some(triple));
        let profile = if release { "release" } else { "debug" };
        let ember = static_dir.join(triple).join(profile).join("ember");
        if run_build(build)? && process::is_executable(&ember) {
            found.push(ember);
        } else {
            eprintln!("exit-rate: the static-pie build of ember failed; its rows are left out");
        }
    }
    Ok(found)
}

/// `cargo build -p ember-vmm --bin ember` into `target_dir`; with `static_triple`, for
/// that target with `-C target-feature=+crt-static` added to `RUSTFLAGS` (naming the
/// target keeps the flag away from build scripts and proc macros).
fn cargo_build(
    cargo: &std::ffi::OsStr,
    target_dir: &Path,
    release: bool,
    static_triple: Option<&str>,
) -> Command {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut build = Command::new(cargo);
    build
        .arg("build")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .args(["-p", "ember-vmm", "--bin", "ember"]);
    if release {
        build.arg("--release");
    }
    if let Some(triple) = static_triple {
        let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
        flags.push_str(" -C target-feature=+crt-static");
        build
            .args(["--target", triple])
            .env("RUSTFLAGS", flags.trim());
    }
    build
}

/// Runs a build, saying what it runs; whether it succeeded.
fn run_build(mut build: Command) -> Result<bool, Box<dyn Error>> {
    eprintln!("exit-rate: building ember: {build:?}");
    Ok(build.status()?.success())
}

/// QEMU with a `-cpu` it accepts on this host, or why there is none.
fn find_qemu(options: &Options, startup: &Path) -> Result<Vmm, String> {
    if options.no_qemu {
        return Err("left out (--no-qemu)".into());
    }
    let path = match &options.qemu {
        Some(path) if process::is_executable(path) => path.clone(),
        Some(path) => return Err(format!("--qemu {}: not an executable file", path.display())),
        None => process::which("qemu-system-x86_64").ok_or(
            "qemu-system-x86_64 is not installed (not in PATH); on Debian: \
             `apt-get install qemu-system-x86`",
        )?,
    };
    let mut failures = Vec::new();
    for cpu in QEMU_CPUS {
        let qemu = Vmm::qemu(path.clone(), cpu);
        let expected = qemu.debug_exit_status(guest::BOOT_DONE_MAGIC);
        match qemu.run(startup, expected, false) {
            Ok(_) => return Ok(qemu),
            Err(e) => failures.push(format!("-cpu {cpu}: {e}")),
        }
    }
    Err(format!(
        "{} cannot run the guest: {}",
        path.display(),
        failures.join("; ")
    ))
}

fn per_exit(ns: std::time::Duration, exits: u64) -> f64 {
    ns.as_nanos() as f64 / exits.max(1) as f64
}

fn run(options: &Options, argv: &[String]) -> Result<(), Box<dyn Error>> {
    if cfg!(debug_assertions) {
        eprintln!("exit-rate: WARNING: a debug build; run with --release for real figures");
    }
    let uptime_before = uptime();
    let n = options.iterations;
    let images = Images::new()?;
    let mut workload_images = Vec::new();
    for workload in Workload::ALL {
        let with = images.write(&format!("{}-{n}.elf", workload.tag()), &workload.image(n)?)?;
        let without = images.write(&format!("{}-0.elf", workload.tag()), &workload.image(0)?)?;
        workload_images.push((workload, with, without));
    }
    let startup = images.write("startup.elf", &guest::startup_image()?)?;

    let mut vmms = Vec::new();
    let mut missing = Vec::new();
    let embers = find_ember(options)?;
    if embers.is_empty() {
        missing.push(
            "`ember`: not found next to this binary; build it with \
             `cargo build --release -p ember-vmm` or pass --ember PATH"
                .to_string(),
        );
    }
    vmms.extend(embers.into_iter().map(Vmm::ember));
    match find_qemu(options, &startup) {
        Ok(qemu) => {
            eprintln!(
                "exit-rate: QEMU: {} -cpu {}",
                qemu.path.display(),
                qemu.qemu_cpu
            );
            vmms.push(qemu);
        }
        Err(why) => {
            eprintln!("exit-rate: QEMU MISSING: {why}; its rows are left out");
            missing.push(format!("QEMU: {why}"));
        }
    }

    eprintln!(
        "exit-rate: {n} writes per run, {} run(s) per way and workload, interleaved; \
         warming up...",
        options.repeat
    );
    for workload in Workload::ALL {
        for side in Side::ALL {
            measure::run(side, workload, WARM_UP_ITERATIONS.min(n))?;
        }
    }
    for vmm in &vmms {
        vmm.run(
            &startup,
            vmm.debug_exit_status(first_exit_value(vmm)),
            false,
        )?;
    }

    let mut comparisons = Vec::new();
    for (workload, with, without) in &workload_images {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); Side::ALL.len()];
        let mut process_runs: Vec<(Vec<ProcessRun>, Vec<ProcessRun>)> =
            vec![(Vec::new(), Vec::new()); vmms.len()];
        for r in 0..options.repeat {
            for (i, side) in Side::ALL.into_iter().enumerate() {
                let s = measure::run(side, *workload, n)?;
                eprintln!(
                    "  {} {} run {}/{}: {:.0} ns/exit wall, {:.0} user, {:.0} sys{}",
                    workload.name(),
                    side.name(),
                    r + 1,
                    options.repeat,
                    per_exit(s.wall, s.exits),
                    per_exit(s.cpu.user, s.exits),
                    per_exit(s.cpu.system, s.exits),
                    s.vmm_ns
                        .map(|v| format!(", {v:.0} ns in the VMM (timed)"))
                        .unwrap_or_default(),
                );
                samples[i].push(s);
            }
            for (i, vmm) in vmms.iter().enumerate() {
                let expected = vmm.debug_exit_status(0);
                let full = vmm.run(with, expected, false)?;
                let empty = vmm.run(without, expected, false)?;
                eprintln!(
                    "  {} {} run {}/{}: t(N) {:.1} ms wall, {:.1} user, {:.1} sys; t(0) {:.1} ms \
                     wall",
                    workload.name(),
                    vmm.name(),
                    r + 1,
                    options.repeat,
                    full.wall.as_secs_f64() * 1e3,
                    full.user.as_secs_f64() * 1e3,
                    full.system.as_secs_f64() * 1e3,
                    empty.wall.as_secs_f64() * 1e3,
                );
                process_runs[i].0.push(full);
                process_runs[i].1.push(empty);
            }
        }
        let mut rows = Vec::new();
        for (i, side) in Side::ALL.into_iter().enumerate() {
            rows.push(Summary::new(side, &samples[i]).ok_or("a run loop saw no exits")?);
        }
        for (vmm, (full, empty)) in vmms.iter().zip(&process_runs) {
            let label = match vmm.kind {
                VmmKind::Ember => format!("{}, whole process", vmm.name()),
                VmmKind::Qemu => format!("QEMU {} microvm, whole process", qemu_version(vmm)),
            };
            rows.push(
                Summary::from_processes(&label, u64::from(n), full, empty)
                    .ok_or("no process runs to summarise")?,
            );
        }
        comparisons.push(Comparison {
            workload: workload.name().to_string(),
            rows,
        });
    }

    eprintln!(
        "exit-rate: start-up: {} timed and {TRACED_RUNS} traced run(s) per VMM",
        options.startup_runs
    );
    let mut startups = Vec::new();
    let mut timed: Vec<Vec<ProcessRun>> = vec![Vec::new(); vmms.len()];
    for round in 0..options.startup_runs {
        // Each VMM goes first in turn, and every run starts after a pause, so that no
        // VMM always inherits the previous VM's tear-down work (KVM frees a VM partly
        // in deferred kernel work) or a CPU that has just gone idle.
        for k in 0..vmms.len() {
            let i = (round + k) % vmms.len();
            let vmm = &vmms[i];
            std::thread::sleep(STARTUP_PAUSE);
            let run = vmm.run(
                &startup,
                vmm.debug_exit_status(first_exit_value(vmm)),
                false,
            )?;
            timed[i].push(run);
        }
    }
    for (vmm, runs) in vmms.iter().zip(&timed) {
        let mut traced = Vec::new();
        for _ in 0..TRACED_RUNS {
            traced.push(vmm.run(&startup, vmm.debug_exit_status(first_exit_value(vmm)), true)?);
        }
        let reported: Vec<f64> = runs
            .iter()
            .filter_map(|r| process::boot_done_ms(&r.stderr))
            .collect();
        if vmm.kind == VmmKind::Ember && reported.len() != runs.len() {
            return Err("ember did not report `guest boot done` on every run".into());
        }
        let row = Startup::new(vmm.name(), runs, &reported, &traced).ok_or("no start-up runs")?;
        eprintln!("  {}: {row:?}", vmm.name());
        startups.push(row);
    }

    print_report(
        options,
        argv,
        &uptime_before,
        &comparisons,
        &startups,
        &vmms,
        &missing,
    );
    Ok(())
}

/// The value the start-up guest's first I/O exit ends the VMM with: `ember` runs on to
/// the debug-exit write of 0; QEMU ends at the boot-done write, which falls inside
/// `isa-debug-exit`'s ports.
fn first_exit_value(vmm: &Vmm) -> u8 {
    match vmm.kind {
        VmmKind::Ember => 0,
        VmmKind::Qemu => guest::BOOT_DONE_MAGIC,
    }
}

/// `7.2.22` from `qemu-system-x86_64 --version`, or empty.
fn qemu_version(vmm: &Vmm) -> String {
    Command::new(&vmm.path)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.split_whitespace()
                .skip_while(|w| *w != "version")
                .nth(1)
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn print_report(
    options: &Options,
    argv: &[String],
    uptime_before: &str,
    comparisons: &[Comparison],
    startups: &[Startup],
    vmms: &[Vmm],
    missing: &[String],
) {
    let extra: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    let mut cargo = "cargo run --release -p ember-benches --bin exit-rate".to_string();
    if !extra.is_empty() {
        cargo = format!("{cargo} -- {}", extra.join(" "));
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let nested = if Path::new("/sys/module/kvm_pvm").exists() {
        "nested, kvm_pvm: guest CPL0 code is emulated"
    } else {
        "kvm_pvm not loaded"
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());

    println!("### Exit round trip\n");
    println!("Command: `{cargo}`\n");
    println!(
        "Host: kernel {kernel} ({nested}), {cpu}, {cores} cores. `uptime` before: `{uptime_before}`; \
         after: `{}`.\n",
        uptime()
    );
    println!(
        "The guest (32-bit protected mode, entered through its PVH note) loops \
         `access; dec ecx; jnz` N = {} times, writes 0 to the debug-exit port and halts. \
         Medians of {} interleaved runs, after a warm-up. In-process rows: CPU times are \
         `getrusage(RUSAGE_THREAD)` of the vCPU thread. Whole-process rows: \
         (median t(N) − median t(0)) / N of wall time and of `wait4` CPU time (all \
         threads), so start-up and tear-down cancel out. User CPU times are tick-sampled \
         (±80 ns/exit or so); \"VMM time ns/exit (measured)\" is the mean time from \
         `KVM_RUN` returning to the next `KVM_RUN` call, read with Ember's exit clock \
         ({}) by Ember's exit timing and, the same way, by the timed floor; in brackets, \
         how much it exceeds the timed floor's.\n",
        options.iterations,
        options.repeat,
        ember_vcpu::clock::ExitClock::get().describe(),
    );
    print!("{}", markdown_table(comparisons));
    for m in missing {
        println!("\nLeft out: {m}");
    }
    if !startups.is_empty() {
        println!("\n### Start-up and footprint\n");
        let qemu = vmms
            .iter()
            .find(|v| v.kind == VmmKind::Qemu)
            .map(|q| format!(" QEMU: `{}`.", q.args(Path::new("guest.elf")).join(" ")))
            .unwrap_or_default();
        println!(
            "A guest whose first I/O is the boot-done write (123 to port 0xf5), then 0 to \
             the debug-exit port: `ember` reports the boot-done exit on its own clock \
             (from `main()`) and runs on to the debug exit; QEMU ends at that first exit \
             (0xf5 is inside `isa-debug-exit,iobase=0xf4,iosize=4`). Medians of {} runs, \
             each VMM first in turn, each run after a 100 ms pause; CPU time is user + \
             system of the whole process (`wait4`), start to exit; \
             memory is read at the process's exit (`ptrace` exit stop, median of \
             {TRACED_RUNS} runs): VmHWM from /proc/PID/status, guest RAM resident from \
             the guest RAM mapping's Rss in /proc/PID/smaps. Guest RAM {} MiB, 1 vCPU, \
             release build.{qemu}\n",
            options.startup_runs,
            process::GUEST_RAM_MIB
        );
        print!("{}", startup_table(startups));
    }
}

/// `uptime`'s output, to tell a quiet machine from a busy one.
fn uptime() -> String {
    Command::new("uptime")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/loadavg")
                .ok()
                .map(|s| format!("load average {}", s.trim()))
        })
        .unwrap_or_else(|| "unknown".into())
}

//! Snapshot and restore benchmark: `ember`'s restore, full snapshot and diff snapshot
//! of a 2-vCPU, 256 MiB VM against floors, as ratios with goals, in one run (the parts
//! are in `ember_benches::snapshot`).
//!
//! `cargo build --release -p ember-vmm && cargo run --release -p ember-benches --bin
//! snapshot [-- --help]`

use std::error::Error;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use ember_benches::process::{self, Ended};
use ember_benches::snapshot::{
    allocated_bytes, dirtied_pages, dirtying_guest, floor_restore, floor_restore_ms, floor_write,
    looping_guest, markdown_table, parse_args, patch_memory_file, restore_guest, Cli, EmberVm,
    Options, Row, SnapshotKind, Stats, DIFF_GOAL, FIRECRACKER_DIFF_MS, FIRECRACKER_FULL_MS,
    FLAG_ADDR, FLOOR_LINE, FULL_GOAL, MEMORY_FILE, RAM_MIB, RAM_SIZE, RESTORE_GOAL, STATE_FILE,
    USAGE, VCPUS,
};
use ember_devices::BOOT_DONE_MAGIC;
use ember_memory::{MemoryLayout, PAGE_SIZE};

/// How long a guest runs after boot (and guest C between its two snapshots).
const SETTLE: Duration = Duration::from_millis(500);
/// The pause between two timed runs.
const PAUSE: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    // The floor-restore child's clock starts here, as `ember`'s starts in its `main()`.
    let start = Instant::now();
    let argv: Vec<String> = std::env::args().collect();
    let options = match parse_args(argv.iter().skip(1).cloned()) {
        Ok(Cli::FloorRestore { dir, syscall_trap }) => {
            return floor_mode(&dir, syscall_trap, start)
        }
        Ok(Cli::Run(options)) => options,
        Ok(Cli::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("snapshot: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    ember_benches::run_with_kvm("snapshot", || run(&options, &argv))
}

/// `snapshot --floor-restore DIR`: the restore floor, in a process of its own.
fn floor_mode(dir: &Path, syscall_trap: bool, start: Instant) -> ExitCode {
    match floor_restore(dir, syscall_trap, start) {
        Ok(t) => {
            eprintln!("{FLOOR_LINE}{:.3} ms", t.as_secs_f64() * 1e3);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("snapshot: floor restore of {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// The benchmark's files: `<target-dir>/snapshot-bench-<pid>` (on the target
/// directory's file system), and the API socket there or, if that path is too long
/// for a socket, in the temporary directory. Removed when dropped.
struct WorkDir {
    path: PathBuf,
    socket: PathBuf,
}

impl WorkDir {
    fn new() -> std::io::Result<WorkDir> {
        let pid = std::process::id();
        let path = ember_benches::target_dir().join(format!("snapshot-bench-{pid}"));
        std::fs::create_dir_all(&path)?;
        let mut socket = path.join("api.sock");
        if socket.as_os_str().len() >= 100 {
            socket = std::env::temp_dir().join(format!("ember-snapshot-bench-{pid}.sock"));
        }
        Ok(WorkDir { path, socket })
    }

    /// The socket path, with any socket a previous `ember` left there removed.
    fn fresh_socket(&self) -> &Path {
        let _ = std::fs::remove_file(&self.socket);
        &self.socket
    }

    fn log(&self) -> PathBuf {
        self.path.join("ember.stderr")
    }

    /// A new empty subdirectory.
    fn subdir(&self, name: &str) -> Result<PathBuf, Box<dyn Error>> {
        let dir = self.path.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(dir)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The guest images, written into the work directory.
struct Images {
    /// Guest A: loops until a flag is set, then exits.
    restore: PathBuf,
    /// Guest B: loops.
    looping: PathBuf,
    /// Guest C: writes 1% of its pages per pass.
    dirtying: PathBuf,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stats(values: &[f64], what: &str) -> Result<Stats, Box<dyn Error>> {
    Stats::new(values).ok_or_else(|| format!("no runs of {what}").into())
}

fn remove_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

fn run(options: &Options, argv: &[String]) -> Result<(), Box<dyn Error>> {
    if cfg!(debug_assertions) {
        eprintln!("snapshot: WARNING: a debug build; run with --release for real figures");
    }
    let ember = match &options.ember {
        Some(path) => path.clone(),
        None => ember_benches::target_dir().join("release").join("ember"),
    };
    if !process::is_executable(&ember) {
        return Err(format!(
            "`ember` not found at {} (not an executable file): build it with \
             `cargo build --release -p ember-vmm`, or pass --ember PATH",
            ember.display()
        )
        .into());
    }
    let uptime_before = uptime();
    let work = WorkDir::new()?;
    eprintln!(
        "snapshot: ember {}, files in {}, {} run(s) per measurement",
        ember.display(),
        work.path.display(),
        options.repeat
    );
    let write = |name: &str, image: Vec<u8>| -> Result<PathBuf, Box<dyn Error>> {
        let path = work.path.join(name);
        std::fs::write(&path, image)?;
        Ok(path)
    };
    let images = Images {
        restore: write("guest-restore.elf", restore_guest()?)?,
        looping: write("guest-loop.elf", looping_guest()?)?,
        dirtying: write("guest-dirty.elf", dirtying_guest(RAM_SIZE)?)?,
    };

    let mut rows = measure_restore(options, &ember, &work, &images)?;
    let full = measure_full(options, &ember, &work, &images)?;
    let diff = measure_diff(options, &ember, &work, &images)?;
    drop(work);

    rows.extend([full, diff.row.clone()]);
    print_report(argv, &uptime_before, &rows, &diff);
    Ok(())
}

/// Measurement 1: restore to the guest's first instruction; a second row against a
/// floor that also sets up the syscall trap, on hosts where `ember` does.
fn measure_restore(
    options: &Options,
    ember: &Path,
    work: &WorkDir,
    images: &Images,
) -> Result<Vec<Row>, Box<dyn Error>> {
    eprintln!("snapshot: 1. restore: booting guest A and taking full snapshots");
    // The syscall trap (an MSR filter whose set-up waits for an SRCU grace period, about
    // 12 ms here) exists only where KVM emulates guest kernel code (nested PVM) and a
    // snapshot records whether it was on. The headline row restores a snapshot taken
    // without it (`--cpu-template host`: what every host with hardware KVM does); on a
    // host that needs the trap, a second row restores one taken with it, against a floor
    // that sets the same filter up.
    let trap = ember_vcpu::cpuid::CpuTemplate::detect().0.syscall_trap();
    let take = |name: &str, extra: &[&str]| -> Result<PathBuf, Box<dyn Error>> {
        let snap = work.subdir(name)?;
        {
            let mut vm = EmberVm::start(
                ember,
                &images.restore,
                work.fresh_socket(),
                false,
                extra,
                &work.log(),
            )?;
            std::thread::sleep(SETTLE);
            vm.pause()?;
            vm.snapshot(
                SnapshotKind::Full,
                &snap.join(STATE_FILE),
                &snap.join(MEMORY_FILE),
            )?;
        } // `ember` killed here.
        let layout = MemoryLayout::new(RAM_SIZE)?;
        patch_memory_file(&snap.join(MEMORY_FILE), &layout, FLAG_ADDR, 1)?;
        Ok(snap)
    };
    let plain = take("restore", &["--cpu-template", "host"])?;
    let trapped = if trap {
        Some(take("restore-trap", &[])?)
    } else {
        None
    };

    let exe = std::env::current_exe()?;
    let restore_ember = |snap: &Path| -> Result<f64, Box<dyn Error>> {
        let mut command = Command::new(ember);
        command
            .arg("--restore")
            .arg(snap)
            .args(["--serial", "none"]);
        let run = process::run(&mut command, None)?;
        if run.ended != Ended::Exited(0) {
            return Err(format!(
                "ember --restore {}: {} (expected exit status 0: the guest read the patched \
                 flag and wrote 0 to the debug-exit port); stderr: {}",
                snap.display(),
                run.ended,
                run.stderr.trim()
            )
            .into());
        }
        process::boot_done_ms(&run.stderr).ok_or_else(|| {
            format!(
                "ember --restore printed no `guest boot done` line; stderr: {}",
                run.stderr.trim()
            )
            .into()
        })
    };
    let restore_floor = |snap: &Path, syscall_trap: bool| -> Result<f64, Box<dyn Error>> {
        let mut command = Command::new(&exe);
        command.arg("--floor-restore").arg(snap);
        if syscall_trap {
            command.arg("--syscall-trap");
        }
        let run = process::run(&mut command, None)?;
        match (run.ended, floor_restore_ms(&run.stderr)) {
            (Ended::Exited(0), Some(ms)) => Ok(ms),
            (ended, _) => Err(format!(
                "the floor restore child: {ended}; stderr: {}",
                run.stderr.trim()
            )
            .into()),
        }
    };
    let sides = if trapped.is_some() { 4 } else { 2 };
    let side = |i: usize| -> Result<f64, Box<dyn Error>> {
        match (i, &trapped) {
            (0, _) => restore_ember(&plain),
            (1, _) => restore_floor(&plain, false),
            (2, Some(t)) => restore_ember(t),
            (_, Some(t)) => restore_floor(t, true),
            (_, None) => Err("no snapshot with the syscall trap".into()),
        }
    };
    // One of each first, not counted: all then read the memory file from the page cache.
    for i in 0..sides {
        side(i)?;
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); sides];
    for r in 0..options.repeat {
        // Each goes first in turn.
        for k in 0..sides {
            std::thread::sleep(PAUSE);
            let i = (r + k) % sides;
            times[i].push(side(i)?);
        }
        let trap_ms = if sides == 4 {
            format!(
                "; with the syscall trap: ember {:.2} ms, floor {:.2} ms",
                times[2][r], times[3][r]
            )
        } else {
            String::new()
        };
        eprintln!(
            "  restore run {}/{}: ember {:.2} ms, floor {:.2} ms{trap_ms}",
            r + 1,
            options.repeat,
            times[0][r],
            times[1][r],
        );
    }
    remove_dir(&plain);
    if let Some(t) = &trapped {
        remove_dir(t);
    }
    let measurement = format!(
        "restore to the guest's first instruction (`ember --restore`, its boot-done \
         figure), {RAM_MIB} MiB, {VCPUS} vCPUs"
    );
    let floor_label = "map the memory file privately, VM + irqchip + PIT + 2 vCPUs, KVM_RUN \
                       to the first exit (child process, from its main)";
    let mut rows = vec![Row {
        measurement: measurement.clone(),
        ember: stats(&times[0], "ember --restore")?,
        floor_label: floor_label.into(),
        floor: stats(&times[1], "the restore floor")?,
        goal: RESTORE_GOAL,
        firecracker_ms: None,
    }];
    if sides == 4 {
        rows.push(Row {
            measurement: format!(
                "{measurement}, a snapshot taken with the syscall trap (nested hosts)"
            ),
            ember: stats(&times[2], "ember --restore with the syscall trap")?,
            floor_label: format!(
                "the same + Ember's syscall trap (its MSR filter waits for an SRCU grace \
                 period): {floor_label}"
            ),
            floor: stats(&times[3], "the restore floor with the syscall trap")?,
            goal: RESTORE_GOAL,
            firecracker_ms: None,
        });
    }
    Ok(rows)
}

/// Measurement 2: a full snapshot of a paused VM: the first snapshot of a freshly
/// booted `ember` each run, so that, like the floor's fresh mapping, its untouched RAM
/// has never been read (a second snapshot of the same VM finds every page already
/// mapped and skips the page faults the first one takes).
fn measure_full(
    options: &Options,
    ember: &Path,
    work: &WorkDir,
    images: &Images,
) -> Result<Row, Box<dyn Error>> {
    eprintln!("snapshot: 2. full snapshot: guest B, a new `ember` per run");
    let snapshot = |dir: &Path| -> Result<f64, Box<dyn Error>> {
        let mut vm = EmberVm::start(
            ember,
            &images.looping,
            work.fresh_socket(),
            false,
            &[],
            &work.log(),
        )?;
        std::thread::sleep(SETTLE);
        vm.pause()?;
        let memory = dir.join(MEMORY_FILE);
        let t = vm.snapshot(SnapshotKind::Full, &dir.join(STATE_FILE), &memory)?;
        drop(vm);
        let len = std::fs::metadata(&memory)?.len();
        if len != RAM_SIZE {
            return Err(format!("the full memory file holds {len} bytes, not {RAM_SIZE}").into());
        }
        Ok(ms(t))
    };
    let floor = |dir: &Path| -> Result<f64, Box<dyn Error>> {
        Ok(ms(floor_write(&dir.join("floor"), RAM_SIZE as usize)?))
    };
    // One of each first, not counted.
    let dir = work.subdir("full-warm-up")?;
    snapshot(&dir)?;
    remove_dir(&dir);
    let dir = work.subdir("full-warm-up")?;
    floor(&dir)?;
    remove_dir(&dir);
    let (mut ember_ms, mut floor_ms) = (Vec::new(), Vec::new());
    for r in 0..options.repeat {
        for k in 0..2 {
            std::thread::sleep(PAUSE);
            let dir = work.subdir(&format!("full-{r}-{k}"))?;
            if (r + k) % 2 == 0 {
                ember_ms.push(snapshot(&dir)?);
            } else {
                floor_ms.push(floor(&dir)?);
            }
            remove_dir(&dir);
        }
        eprintln!(
            "  full snapshot run {}/{}: ember {:.1} ms, floor {:.1} ms",
            r + 1,
            options.repeat,
            ember_ms[r],
            floor_ms[r]
        );
    }
    Ok(Row {
        measurement: format!(
            "full snapshot (`PUT /snapshot/create`, paused, round trip; the first snapshot \
             of a new VM), {RAM_MIB} MiB, {VCPUS} vCPUs"
        ),
        ember: stats(&ember_ms, "full snapshots")?,
        floor_label: format!(
            "write(2) {RAM_MIB} MiB from a new, untouched anonymous mapping to a new file"
        ),
        floor: stats(&floor_ms, "the write floor")?,
        goal: FULL_GOAL,
        firecracker_ms: Some(FIRECRACKER_FULL_MS),
    })
}

/// What the diff snapshots measured.
#[derive(Debug, Clone)]
struct Diff {
    row: Row,
    /// Pages the guest writes per pass.
    pages_written: u64,
    /// Disk space of each diff memory file, bytes.
    allocated: Vec<u64>,
    /// Of the pages the guest writes, how many held its byte in each diff memory file.
    found: Vec<u64>,
    /// `PATCH /vm Paused` round trips, ms.
    pause_ms: Vec<f64>,
    /// `PATCH /vm Resumed` round trips, ms.
    resume_ms: Vec<f64>,
}

/// Measurement 3: a diff snapshot after the guest changed 1% of its pages, against a
/// full snapshot of the same VM just before.
fn measure_diff(
    options: &Options,
    ember: &Path,
    work: &WorkDir,
    images: &Images,
) -> Result<Diff, Box<dyn Error>> {
    eprintln!(
        "snapshot: 3. diff snapshot: guest C with --track-dirty-pages, a new `ember` per run"
    );
    let layout = MemoryLayout::new(RAM_SIZE)?;
    let pages: Vec<u64> = dirtied_pages(RAM_SIZE)
        .map(|addr| {
            ember_benches::snapshot::memory_file_offset(&layout, addr)
                .ok_or_else(|| format!("{addr:#x} is not RAM"))
        })
        .collect::<Result<_, _>>()?;
    let (mut full_ms, mut diff_ms, mut allocated, mut found) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut pause_ms, mut resume_ms) = (Vec::new(), Vec::new());
    for r in 0..options.repeat {
        std::thread::sleep(PAUSE);
        let dir = work.subdir(&format!("diff-{r}"))?;
        let mut vm = EmberVm::start(
            ember,
            &images.dirtying,
            work.fresh_socket(),
            true,
            &[],
            &work.log(),
        )?;
        std::thread::sleep(SETTLE);
        pause_ms.push(ms(vm.pause()?));
        let full = vm.snapshot(
            SnapshotKind::Full,
            &dir.join("full-vmstate"),
            &dir.join("full-memory"),
        )?;
        // Only the diff is looked at; free the full one's space first.
        std::fs::remove_file(dir.join("full-memory"))?;
        resume_ms.push(ms(vm.resume()?));
        std::thread::sleep(SETTLE);
        pause_ms.push(ms(vm.pause()?));
        let memory = dir.join("diff-memory");
        let diff = vm.snapshot(SnapshotKind::Diff, &dir.join("diff-vmstate"), &memory)?;
        drop(vm);
        let bytes = allocated_bytes(&memory)?;
        let file = std::fs::File::open(&memory)?;
        let mut seen = 0u64;
        for &offset in &pages {
            let mut byte = [0u8];
            if file.read_at(&mut byte, offset)? == 1 && byte[0] == BOOT_DONE_MAGIC {
                seen += 1;
            }
        }
        drop(file);
        remove_dir(&dir);
        eprintln!(
            "  diff run {}/{}: full {:.1} ms, diff {:.2} ms, diff memory file {} KiB allocated, \
             {seen}/{} of the guest's pages in it",
            r + 1,
            options.repeat,
            ms(full),
            ms(diff),
            bytes / 1024,
            pages.len()
        );
        full_ms.push(ms(full));
        diff_ms.push(ms(diff));
        allocated.push(bytes);
        found.push(seen);
    }
    if let Some(&seen) = found.iter().find(|&&s| s != pages.len() as u64) {
        return Err(format!(
            "a diff memory file held only {seen} of the {} pages the guest wrote",
            pages.len()
        )
        .into());
    }
    Ok(Diff {
        row: Row {
            measurement: format!(
                "diff snapshot after 1% of the pages changed ({} of {}), --track-dirty-pages",
                pages.len(),
                RAM_SIZE / PAGE_SIZE
            ),
            ember: stats(&diff_ms, "diff snapshots")?,
            floor_label: "the first full snapshot of the same VM, just before (Ember)".into(),
            floor: stats(&full_ms, "full snapshots")?,
            goal: DIFF_GOAL,
            firecracker_ms: Some(FIRECRACKER_DIFF_MS),
        },
        pages_written: pages.len() as u64,
        allocated,
        found,
        pause_ms,
        resume_ms,
    })
}

fn print_report(argv: &[String], uptime_before: &str, rows: &[Row], diff: &Diff) {
    let extra: Vec<&str> = argv.iter().skip(1).map(String::as_str).collect();
    let mut cargo = "cargo run --release -p ember-benches --bin snapshot".to_string();
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
    let fs = filesystem_of(&ember_benches::target_dir()).unwrap_or_else(|| "unknown".into());
    println!("### Snapshot and restore\n");
    println!("Command: `{cargo}`\n");
    println!(
        "Host: kernel {kernel} ({nested}), {} cores, files on {fs}. `uptime` before: \
         `{uptime_before}`; after: `{}`.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        uptime()
    );
    let runs = rows.first().map_or(0, |r| r.ember.runs);
    println!(
        "A {VCPUS}-vCPU VM with {RAM_MIB} MiB of RAM, guests of a few instructions (64-bit \
         entry). Medians of {runs} runs (min–max), each side first in turn, after one \
         uncounted run of each. Restore: guest A polls a flag in a loop writing boot-done; \
         it is snapshotted, the flag is set in the memory file, and the restored guest's \
         first port write is boot-done: `ember`'s own figure from its `main()`, against the \
         floor's from its `main()`. Full: guest B loops, paused; the request's round trip \
         against a plain write of the RAM size (neither `fsync`s). Diff: guest C writes a \
         byte to every {}th page above 2 MiB in a loop; each run pauses, takes a full \
         snapshot, resumes for {} ms, pauses and takes a diff snapshot; the ratio is \
         diff / full. Each full snapshot, in 2 and 3, is the first of a newly booted \
         `ember` (a VM's first snapshot reads its untouched RAM through page faults, as the \
         floor does from its new mapping; a second one would not). Firecracker's figures are its published ones for a 2-vCPU 256 MB VM, \
         on other hardware: context, not a floor.\n",
        ember_benches::snapshot::DIRTY_STRIDE_PAGES,
        SETTLE.as_millis()
    );
    print!("{}", markdown_table(rows));
    let alloc: Vec<f64> = diff.allocated.iter().map(|&b| b as f64).collect();
    if let Some(a) = Stats::new(&alloc) {
        let pages = a.median / PAGE_SIZE as f64;
        println!(
            "\nDiff memory file: {:.0} KiB allocated (st_blocks × 512; median, {:.0}–{:.0}) = \
             {pages:.0} pages, for the {} pages the guest writes per pass ({:.2}×); every one \
             of those held the guest's byte in every diff ({:?}).",
            a.median / 1024.0,
            a.min / 1024.0,
            a.max / 1024.0,
            diff.pages_written,
            pages / diff.pages_written as f64,
            diff.found,
        );
    }
    if let (Some(p), Some(r)) = (Stats::new(&diff.pause_ms), Stats::new(&diff.resume_ms)) {
        println!(
            "\nPause (`PATCH /vm` Paused) round trip: {}; resume: {}.",
            p.ms(),
            r.ms()
        );
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.meets_goal())
        .map(|r| r.measurement.as_str())
        .collect();
    if failed.is_empty() {
        println!("\nEvery goal met.");
    } else {
        println!("\nGoals NOT met: {}.", failed.join("; "));
    }
}

/// The file system type `df -T` reports for `path`.
fn filesystem_of(path: &Path) -> Option<String> {
    let out = Command::new("df").arg("-T").arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .nth(1)?
        .split_whitespace()
        .nth(1)
        .map(str::to_string)
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

//! Debian's stock cloud kernel (fetched by `scripts/linux-guest.sh`) under `ember`.
//!
//! On hosts whose KVM emulates guest kernel code a full boot takes far too long, so
//! these tests check how far a real kernel gets in well under a minute: its banner,
//! the exact command line we passed, the e820 map we gave it, the memory size, and
//! that it found every vCPU. Full boots to the init marker run in the GitHub workflow
//! on hardware KVM.
//!
//! Without the kernel these tests print a loud line and return; with
//! `EMBER_REQUIRE_LINUX=1` (set by `.ci/run`) they fail instead.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ember_guests::testing::kvm_available;

struct LinuxGuest {
    bzimage: PathBuf,
    vmlinux: PathBuf,
    initramfs: PathBuf,
}

fn linux_guest(test: &str) -> Option<LinuxGuest> {
    if !kvm_available(test) {
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/linux-guest.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output();
    let text = match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        other => {
            let required = std::env::var("EMBER_REQUIRE_LINUX").is_ok_and(|v| v == "1");
            eprintln!(
                "!!! LINUX GUEST UNAVAILABLE: test `{test}` did NOT run: {} failed: {other:?}",
                script.display()
            );
            assert!(
                !required,
                "{test}: EMBER_REQUIRE_LINUX=1 but the Linux guest is unavailable"
            );
            return None;
        }
    };
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{key} missing from the script's output: {text}"))
    };
    Some(LinuxGuest {
        bzimage: get("KERNEL_BZIMAGE"),
        vmlinux: get("KERNEL_VMLINUX"),
        initramfs: get("INITRAMFS"),
    })
}

/// What a boot printed, and when each expected line first appeared.
struct Boot {
    console: Vec<String>,
    stderr: String,
    seen: Vec<Option<Duration>>,
}

/// Runs `ember` until every needle has appeared in a console line (or `limit`
/// passes), then stops it with SIGTERM.
fn boot_until(args: &[&str], needles: &[&str], limit: Duration) -> Boot {
    let start = Instant::now();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start ember");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stderr_pipe = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });
    let mut boot = Boot {
        console: Vec::new(),
        stderr: String::new(),
        seen: vec![None; needles.len()],
    };
    while needles.is_empty() || boot.seen.iter().any(Option::is_none) {
        let Some(left) = limit.checked_sub(start.elapsed()) else {
            break;
        };
        match rx.recv_timeout(left) {
            Ok(line) => {
                for (i, needle) in needles.iter().enumerate() {
                    if boot.seen[i].is_none() && line.contains(needle) {
                        boot.seen[i] = Some(start.elapsed());
                    }
                }
                boot.console.push(line);
            }
            Err(_) => break,
        }
    }
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    boot.console.extend(rx.try_iter());
    let _ = reader.join();
    boot.stderr = err_reader.join().unwrap();
    assert!(!boot.stderr.contains("panicked"), "{}", boot.stderr);
    // Stopped by our SIGTERM (143), or the guest ended it by itself.
    assert!(
        status.code().is_some(),
        "ember killed by a signal: {}",
        boot.stderr
    );
    for (needle, when) in needles.iter().zip(&boot.seen) {
        match when {
            Some(t) => eprintln!("  {:>7.2} s  {needle}", t.as_secs_f64()),
            None => panic!(
                "`{needle}` not seen within {limit:?}.\n--- console ---\n{}\n--- stderr ---\n{}",
                boot.console.join("\n"),
                boot.stderr
            ),
        }
    }
    boot
}

fn kernel_code_is_emulated() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The command line the kernel should report: ours, plus what the CPU template adds.
fn expected_cmdline(ours: &str) -> String {
    if kernel_code_is_emulated() {
        let params = ember_vcpu::cpuid::CpuTemplate::NestedCompat.kernel_params();
        format!("{ours} {}", params.join(" "))
    } else {
        ours.to_string()
    }
}

/// The e820 lines Linux prints for Ember's layout of `mib` MiB (below 3 GiB).
fn expected_e820(mib: u64) -> Vec<String> {
    vec![
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".to_string(),
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved".to_string(),
        format!(
            "BIOS-e820: [mem 0x0000000000100000-0x{:016x}] usable",
            (mib << 20) - 1
        ),
    ]
}

fn e820_lines(console: &[String]) -> Vec<String> {
    console
        .iter()
        .filter_map(|l| l.find("BIOS-e820: ").map(|i| l[i..].trim_end().to_string()))
        .collect()
}

const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 ember.test=1";

#[test]
fn debian_kernel_through_pvh_sees_our_cmdline_e820_memory_and_both_vcpus() {
    let Some(guest) =
        linux_guest("debian_kernel_through_pvh_sees_our_cmdline_e820_memory_and_both_vcpus")
    else {
        return;
    };
    let cmdline = expected_cmdline(CMDLINE);
    let command_line = format!("Command line: {cmdline}");
    // Linux counts whole pages of usable RAM, without page 0: [4K, 0x9f000) and
    // [1M, 512M).
    let total_kib = ((0x9f000 - 0x1000) + ((512u64 << 20) - 0x10_0000)) / 1024;
    let memory = format!("/{total_kib}K available");
    let needles = [
        "Linux version 6.1",
        command_line.as_str(),
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        "last_pfn = 0x20000 ",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
        memory.as_str(),
    ];
    let boot = boot_until(
        &[
            "--kernel",
            guest.vmlinux.to_str().unwrap(),
            "--initrd",
            guest.initramfs.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "512M",
            "--entry",
            "pvh",
            "--cmdline",
            CMDLINE,
            "-v",
        ],
        &needles,
        Duration::from_secs(150),
    );
    assert!(
        boot.stderr.contains("entering through PVH"),
        "{}",
        boot.stderr
    );
    // Exactly our command line, and exactly our e820 map.
    assert!(
        boot.console.iter().any(|l| l.ends_with(&command_line)),
        "{:?}",
        boot.console
    );
    assert_eq!(e820_lines(&boot.console), expected_e820(512));
    // The initrd we handed over is where the kernel looks for it.
    assert!(
        boot.console.iter().any(|l| l.contains("RAMDISK: [mem ")),
        "{:?}",
        boot.console
    );
}

#[test]
fn debian_kernel_through_the_64_bit_entry() {
    let Some(guest) = linux_guest("debian_kernel_through_the_64_bit_entry") else {
        return;
    };
    let cmdline = expected_cmdline(CMDLINE);
    let command_line = format!("Command line: {cmdline}");
    let needles = [
        "Linux version 6.1",
        command_line.as_str(),
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        "smpboot: Allowing 1 CPUs, 0 hotplug CPUs",
    ];
    let boot = boot_until(
        &[
            "--kernel",
            guest.vmlinux.to_str().unwrap(),
            "--memory",
            "256M",
            "--entry",
            "64bit",
            "--cmdline",
            CMDLINE,
            "-v",
        ],
        &needles,
        Duration::from_secs(90),
    );
    assert!(
        boot.stderr.contains("entering through the 64-bit entry"),
        "{}",
        boot.stderr
    );
    assert_eq!(e820_lines(&boot.console), expected_e820(256));
}

#[test]
fn debian_bzimage_loads_and_its_decompressor_runs() {
    let Some(guest) = linux_guest("debian_bzimage_loads_and_its_decompressor_runs") else {
        return;
    };
    let args = [
        "--kernel",
        guest.bzimage.to_str().unwrap(),
        "--memory",
        "512M",
        "--cmdline",
        CMDLINE,
        "-vv",
    ];
    if !kernel_code_is_emulated() {
        // Hardware KVM decompresses in about a second: the kernel itself then speaks.
        let command_line = format!("Command line: {CMDLINE}");
        let boot = boot_until(
            &args,
            &["Linux version 6.1", &command_line],
            Duration::from_secs(60),
        );
        assert_eq!(e820_lines(&boot.console), expected_e820(512));
        return;
    }
    // Here the decompressor's LZ4 pass takes minutes, and Debian's build prints nothing
    // before it (no CONFIG_X86_VERBOSE_BOOTUP). What shows that it runs is its early
    // serial set-up (port writes to COM1) and where the vCPU is when stopped.
    let boot = boot_until(&args, &[], Duration::from_secs(15));
    let log = &boot.stderr;
    let loaded = log
        .lines()
        .find(|l| l.contains("loaded bzImage"))
        .unwrap_or_else(|| panic!("no load line: {log}"));
    assert!(loaded.contains("64-bit entry 0x100200"), "{loaded}");
    // "... at 0x100000..0x4378000; 64-bit entry ...": the range the kernel may use.
    let range = loaded
        .split(" at ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap();
    let (lo, hi) = range.split_once("..").unwrap();
    let parse = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap();
    let (lo, hi) = (parse(lo), parse(hi));
    let rip = log
        .lines()
        .find_map(|l| l.split("vCPU 0 stopped at RIP ").nth(1))
        .map(parse)
        .unwrap_or_else(|| panic!("no RIP: {log}"));
    assert!(
        (lo..hi).contains(&rip),
        "RIP {rip:#x} outside {lo:#x}..{hi:#x}"
    );
    let io_out: u64 = log
        .lines()
        .find_map(|l| l.split("io-out ").nth(1))
        .and_then(|n| n.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no io-out count: {log}"));
    assert!(
        io_out >= 7,
        "the decompressor's UART set-up is 7 port writes; saw {io_out}"
    );
}

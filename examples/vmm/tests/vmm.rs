//! The `ember` binary end to end: the demo guest, guests assembled here, and bad input.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use ember_guests::asm::assemble;
use ember_guests::elf::{flat_elf, GUEST_LOAD_ADDR};
use ember_guests::testing::kvm_available;
use iced_x86::code_asm::*;
use iced_x86::IcedError;

fn ember(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start ember");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "ember panicked: {stderr}");
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a failure with exactly one `ember: error:` line containing `needle`.
fn assert_one_error_line(out: &Output, needle: &str) {
    let err = stderr(out);
    assert_ne!(out.status.code(), Some(0), "should fail; stderr: {err}");
    assert!(out.status.code().is_some(), "killed by a signal: {err}");
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("ember: error: "), "{err}");
    assert!(lines[0].contains(needle), "expected {needle:?} in: {err}");
}

/// A guest assembled here, wrapped as an ELF kernel in a temporary file.
fn guest_kernel(
    dir: &tempfile::TempDir,
    name: &str,
    build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> PathBuf {
    let code = assemble(GUEST_LOAD_ADDR, build).unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, flat_elf(GUEST_LOAD_ADDR, &code, 0)).unwrap();
    path
}

#[test]
fn demo_guest_runs_and_reports_what_it_sees() {
    if !kvm_available("demo_guest_runs_and_reports_what_it_sees") {
        return;
    }
    let out = ember(&[], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("Ember demo guest: running in 64-bit mode"),
        "{text}"
    );
    assert!(
        text.contains("Ember demo guest: 1 of 1 vCPUs online, APIC IDs: 0\n"),
        "{text}"
    );
    // 256 MiB, of which the EBDA/BIOS area [0x9fc00, 1 MiB) is reserved.
    assert!(
        text.contains("256 MiB in the e820 map, 261759 KiB of it usable RAM"),
        "{text}"
    );
    assert!(
        stderr(&out).contains("guest boot done after"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn demo_guest_sees_every_vcpu_and_all_memory() {
    if !kvm_available("demo_guest_sees_every_vcpu_and_all_memory") {
        return;
    }
    let out = ember(&["--cpus", "2", "--memory", "512M"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("2 of 2 vCPUs online, APIC IDs: 0 1\n"),
        "{text}"
    );
    assert!(text.contains("512 MiB in the e820 map"), "{text}");
    // Memory above the 32-bit MMIO hole is found too.
    let out = ember(&["--memory", "4G"], b"");
    assert!(
        stdout(&out).contains("4096 MiB in the e820 map"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn demo_guest_reads_sector_0_of_a_virtio_disk() {
    if !kvm_available("demo_guest_reads_sector_0_of_a_virtio_disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let mut image = vec![0u8; 64 * 1024];
    image[..19].copy_from_slice(b"Hello from the disk");
    image[19] = 0x01; // not printable: shown as '.'
    std::fs::write(&disk, &image).unwrap();
    let out = ember(
        &[
            "--disk",
            &format!("path={},readonly=on", disk.display()),
            "-v",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let expected = format!(
        "Ember demo guest: virtio-blk sector 0: Hello from the disk.{}\n",
        ".".repeat(12)
    );
    assert!(text.contains(&expected), "{text}");
    assert!(
        stderr(&out).contains("virtio-mmio at 0xd0000000, GSI 5"),
        "{}",
        stderr(&out)
    );
    // No disk, no virtio line.
    let out = ember(&[], b"");
    assert!(!stdout(&out).contains("virtio-blk"), "{}", stdout(&out));
}

#[test]
fn missing_or_bad_disk_is_one_clear_error() {
    assert_one_error_line(
        &ember(&["--disk", "path=/nonexistent/disk.img"], b""),
        "/nonexistent/disk.img",
    );
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, [0u8; 1000]).unwrap();
    assert_one_error_line(
        &ember(&["--disk", &format!("path={}", odd.display())], b""),
        "512",
    );
}

#[test]
fn serial_output_to_a_file_or_nowhere() {
    if !kvm_available("serial_output_to_a_file_or_nowhere") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let out = ember(&["--serial", &format!("file={}", log.display())], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("Ember demo guest: done, exiting with code 0"),
        "{text}"
    );

    let out = ember(&["--serial", "none"], b"");
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).is_empty());

    let out = ember(
        &[
            "--serial",
            &format!("file={}", dir.path().join("no/such/dir").display()),
        ],
        b"",
    );
    assert_one_error_line(&out, "no/such/dir");
}

#[test]
fn debug_exit_code_becomes_the_exit_status() {
    if !kvm_available("debug_exit_code_becomes_the_exit_status") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest_kernel(&dir, "exit42", |a| {
        a.mov(al, 42u32)?;
        a.out(0xf4, al)?;
        a.hlt()
    });
    let out = ember(&["--kernel", kernel.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(42), "{}", stderr(&out));
}

#[test]
fn i8042_reset_ends_the_vm_cleanly() {
    if !kvm_available("i8042_reset_ends_the_vm_cleanly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest_kernel(&dir, "reset", |a| {
        a.mov(al, 0xfeu32)?;
        a.out(0x64, al)?;
        // Without the reset this would exit with 9.
        a.mov(al, 9u32)?;
        a.out(0xf4, al)?;
        a.hlt()
    });
    let out = ember(&["--kernel", kernel.to_str().unwrap(), "-v"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("i8042"), "{}", stderr(&out));
}

/// Linux's hardware-reduced power-off, done by hand: the sleep control register's port
/// from the FADT (its generic address at offset 244, the address 4 bytes in), `WAK_STS`
/// cleared in the sleep status register, then `(SLP_TYP 5 << 2) | SLP_EN`.
#[test]
fn acpi_power_off_ends_the_vm_cleanly() {
    if !kvm_available("acpi_power_off_ends_the_vm_cleanly") {
        return;
    }
    const FADT: u64 = 0xe0100;
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest_kernel(&dir, "poweroff", |a| {
        a.mov(edx, dword_ptr(FADT + 244 + 4))?;
        a.mov(al, 0x80u32)?;
        a.out(dx, al)?;
        a.mov(al, (5u32 << 2) | 1 << 5)?;
        a.out(dx, al)?;
        // Without the power-off this would exit with 9.
        a.mov(al, 9u32)?;
        a.out(0xf4, al)?;
        a.hlt()
    });
    let out = ember(&["--kernel", kernel.to_str().unwrap(), "-v"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("ACPI (S5)"), "{}", stderr(&out));
}

#[test]
fn serial_input_comes_from_stdin() {
    if !kvm_available("serial_input_comes_from_stdin") {
        return;
    }
    // Poll the line status register until data is ready, then exit with the byte read.
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest_kernel(&dir, "echo", |a| {
        let mut wait = a.create_label();
        a.mov(dx, 0x3fdu32)?;
        a.set_label(&mut wait)?;
        a.in_(al, dx)?;
        a.test(al, 1u32)?;
        a.jz(wait)?;
        a.mov(dx, 0x3f8u32)?;
        a.in_(al, dx)?;
        a.out(0xf4, al)?;
        a.hlt()
    });
    let out = ember(&["--kernel", kernel.to_str().unwrap()], b"A");
    assert_eq!(out.status.code(), Some(65), "{}", stderr(&out));
}

#[test]
fn emulation_failure_is_one_clear_error() {
    if !kvm_available("emulation_failure_is_one_clear_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest_kernel(&dir, "jump-to-mmio", |a| {
        a.mov(rax, 0xd000_0000u64)?;
        a.jmp(rax)
    });
    let out = ember(&["--kernel", kernel.to_str().unwrap(), "--cpus", "2"], b"");
    assert_one_error_line(
        &out,
        "vCPU 0: KVM cannot emulate the instruction at RIP 0xd0000000",
    );
}

#[test]
fn unemulatable_instruction_names_it_and_says_what_to_try() {
    if !kvm_available("unemulatable_instruction_names_it_and_says_what_to_try") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest_kernel(&dir, "int3", |a| {
        a.nop()?;
        a.int3()
    });
    let kernel = kernel.to_str().unwrap();
    // By default the instruction fallback completes int3 where the host cannot (and
    // hardware runs it): #BP with an empty IDT triple-faults either way.
    let out = ember(&["--kernel", kernel], b"");
    assert_one_error_line(&out, "triple-faulted");
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return;
    }
    // Without the fallback this host stops on it, and ember says what to use.
    let out = ember(&["--kernel", kernel, "--cpu-template", "host"], b"");
    assert_one_error_line(&out, "at RIP 0x100001 (int3; bytes: cc");
    assert_one_error_line(
        &out,
        "try: the instruction fallback completes this instruction",
    );
    // An instruction the fallback leaves alone is still one clear error.
    let kernel = guest_kernel(&dir, "popcnt", |a| {
        a.nop()?;
        a.popcnt(rax, rax)
    });
    let out = ember(&["--kernel", kernel.to_str().unwrap()], b"");
    assert_one_error_line(
        &out,
        "at RIP 0x100001 (popcnt rax,rax; bytes: f3 48 0f b8 c0",
    );
    assert_one_error_line(&out, "clearcpuid=popcnt");
}

#[test]
fn triple_fault_is_one_clear_error() {
    if !kvm_available("triple_fault_is_one_clear_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest_kernel(&dir, "ud2", |a| a.ud2());
    let out = ember(&["--kernel", kernel.to_str().unwrap()], b"");
    assert_one_error_line(&out, "triple-faulted");
}

#[test]
fn missing_kernel_file() {
    let out = ember(&["--kernel", "/nonexistent/vmlinux"], b"");
    assert_one_error_line(&out, "cannot read kernel /nonexistent/vmlinux");
}

#[test]
fn kernel_of_random_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random");
    // Deterministic noise (xorshift), not starting with the ELF magic.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let bytes: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    assert_ne!(&bytes[..4], b"\x7fELF");
    std::fs::write(&path, bytes).unwrap();
    let out = ember(&["--kernel", path.to_str().unwrap()], b"");
    assert_one_error_line(&out, "bad ELF magic");
}

#[test]
fn elf_segment_outside_guest_memory() {
    if !kvm_available("elf_segment_outside_guest_memory") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("too-high");
    // Linked at 1 GiB, but the guest has 64 MiB.
    std::fs::write(&path, flat_elf(0x4000_0000, &[0xf4], 0)).unwrap();
    let out = ember(
        &["--kernel", path.to_str().unwrap(), "--memory", "64M"],
        b"",
    );
    assert_one_error_line(&out, "does not fit in guest memory");
    // The loaded file is not modified.
    assert_eq!(
        std::fs::read(&path).unwrap(),
        flat_elf(0x4000_0000, &[0xf4], 0)
    );
}

#[test]
fn bad_vcpu_counts() {
    assert_one_error_line(&ember(&["--cpus", "0"], b""), "at least one vCPU");
    assert_one_error_line(&ember(&["--cpus", "-1"], b""), "--cpus");
    if !kvm_available("bad_vcpu_counts") {
        return;
    }
    assert_one_error_line(
        &ember(&["--cpus", "4000"], b""),
        "4000 vCPUs requested, but at most",
    );
    assert_one_error_line(
        &ember(&["--cpus", "255"], b""),
        "255 vCPUs requested, but at most",
    );
}

#[test]
fn bad_memory_sizes() {
    assert_one_error_line(&ember(&["--memory", "1"], b""), "below the minimum 16 MiB");
    assert_one_error_line(
        &ember(&["--memory", "12X"], b""),
        "invalid memory size '12X'",
    );
    assert_one_error_line(&ember(&["--memory", "2T"], b""), "invalid memory size");
    assert_one_error_line(&ember(&["--memory", "4096G"], b""), "above the maximum");
    assert_one_error_line(&ember(&["--memory", "1000K"], b""), "guest memory");
}

#[test]
fn bad_command_lines() {
    assert_one_error_line(&ember(&["--serial", "tcp"], b""), "invalid serial 'tcp'");
    assert_one_error_line(&ember(&["--no-such-flag"], b""), "--no-such-flag");
    let long = "x".repeat(5000);
    assert_one_error_line(&ember(&["--cmdline", &long], b""), "command line");
    assert_one_error_line(
        &ember(&["--initrd", "/nonexistent/initrd"], b""),
        "cannot read initrd",
    );
}

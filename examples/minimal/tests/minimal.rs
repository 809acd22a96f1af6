//! Runs the `ember-minimal` binary as a user would: on the demo guest, and on bad input.

use std::path::Path;
use std::process::{Command, Output};

use ember_devices::{BOOT_DONE_MAGIC, BOOT_DONE_PORT, COM1_PORT, DEBUG_EXIT_PORT, I8042_PORT};
use ember_guests::demo::{demo_elf, DemoPorts};
use ember_guests::elf::{flat_elf, GUEST_LOAD_ADDR};
use ember_guests::testing::kvm_available;

fn ember_minimal(args: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ember-minimal"))
        .args(args)
        .output()
        .expect("cannot start ember-minimal")
}

/// Asserts that the run failed with exactly one `ember-minimal: error:` line that
/// mentions `what`.
fn assert_one_error_line(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "stderr: {stderr}");
    assert!(stderr.starts_with("ember-minimal: error: "), "{stderr}");
    assert!(stderr.contains(what), "expected {what:?} in {stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn boots_the_demo_guest_and_exits_with_its_code() {
    if !kvm_available("boots_the_demo_guest_and_exits_with_its_code") {
        return;
    }
    let ports = DemoPorts {
        serial: COM1_PORT,
        debug_exit: DEBUG_EXIT_PORT,
        boot_done: BOOT_DONE_PORT,
        boot_done_magic: BOOT_DONE_MAGIC,
    };
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("demo.elf");
    std::fs::write(&kernel, demo_elf(&ports).unwrap()).unwrap();

    let out = ember_minimal(&[&kernel]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    for line in [
        "Ember demo guest: running in 64-bit mode",
        "Ember demo guest: 1 of 1 vCPUs online, APIC IDs: 0",
        // 256 MiB of RAM, all below the MMIO hole.
        "Ember demo guest: 256 MiB in the e820 map",
        "Ember demo guest: done, exiting with code 0",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    assert!(stderr.is_empty(), "stderr: {stderr}");
}

/// Writes a flat ELF guest made of `code` into `dir` and runs `ember-minimal` on it.
fn run_code(dir: &Path, code: &[u8]) -> Output {
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, flat_elf(GUEST_LOAD_ADDR, code, 0)).unwrap();
    ember_minimal(&[&kernel])
}

#[test]
fn the_debug_exit_code_is_the_exit_status() {
    if !kvm_available("the_debug_exit_code_is_the_exit_status") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = u8::try_from(DEBUG_EXIT_PORT).unwrap();
    // mov al, 7; out DEBUG_EXIT_PORT, al; hlt
    let out = run_code(dir.path(), &[0xb0, 7, 0xe6, port, 0xf4]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
}

#[test]
fn a_reset_through_the_i8042_ends_the_vm_with_status_0() {
    if !kvm_available("a_reset_through_the_i8042_ends_the_vm_with_status_0") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let command_port = u8::try_from(I8042_PORT + 4).unwrap();
    // mov al, 0xfe (pulse the reset line); out I8042_PORT + 4, al; hlt
    let out = run_code(dir.path(), &[0xb0, 0xfe, 0xe6, command_port, 0xf4]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
}

#[test]
fn a_triple_fault_is_one_error_line() {
    if !kvm_available("a_triple_fault_is_one_error_line") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // ud2, with no IDT to deliver #UD through: a triple fault.
    let out = run_code(dir.path(), &[0x0f, 0x0b]);
    assert_one_error_line(&out, "the vCPU ended the VM: Shutdown");
}

#[test]
fn a_missing_kernel_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-vmlinux");
    let out = ember_minimal(&[&missing]);
    assert_one_error_line(&out, "cannot read the kernel");
    assert_one_error_line(&out, "no-such-vmlinux");
}

#[test]
fn a_file_that_is_not_an_elf_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let not_elf = dir.path().join("vmlinux");
    // Longer than an ELF header, so it is the magic number that is wrong.
    std::fs::write(&not_elf, b"not a kernel\n".repeat(10)).unwrap();
    let out = ember_minimal(&[&not_elf]);
    assert_one_error_line(&out, "cannot load the kernel");
    assert_one_error_line(&out, "ELF magic");
}

#[test]
fn no_arguments_is_the_usage_line() {
    let out = ember_minimal(&[]);
    assert_one_error_line(&out, "usage: ember-minimal <vmlinux> [cmdline]");
}
